// Vectorized inner loops of the CPU kernels (csrc/cpu/batch_norm.cpp).
//
// Every loop walks one contiguous run of n values of scalar_t, loaded as opmath vectors
// (float for float/half/bfloat16, double for double), two vectors per step so that each sum has
// two independent accumulators. Values past the last whole step go through the same operation
// as scalars. Per-channel coefficients reach an operation as a Scalar (channels-first: the run is
// one channel) or a PerLane array (channels-last: the run is a row, lane i is channel i).
//
// Operations are generic lambdas `op(i, x, g[, acc])` called with T = a vector type for a step
// and T = opmath for a scalar, where i is the index in the run of the first value of x, and g is
// the second input (dy) or, for one-input loops, an unused zero.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>

// The loops are compiled twice on x86-64 with GCC: for baseline x86-64 and for x86-64-v3 (AVX2,
// FMA, F16C), and each call runs the version the CPU supports (checked once; the environment
// variable BN_CUDA_CPU_ISA=baseline forces the baseline, which is how the tests cover it here).
// The v3 version gets 256-bit vectors (~2x the baseline's throughput on cache-resident tensors)
// and converts half <-> float with F16C's single instructions (~4x less work per value than the
// integer sequence the baseline needs). Results may differ between the two in the last bit
// where v3 fuses a multiply and an add into one FMA. Only the v3 version writes large outputs
// with non-temporal stores (map_segments, map_planes, map_cached_rows); the baseline keeps plain
// stores.
// 32-byte vector arguments and results have a different ABI with and without AVX, so a function
// that takes or returns one must never be called across ISAs: the operations (lambdas) and the
// coefficient accessors (Scalar/PerLane::at) are forced inline into the loops that use them
// (BN_CUDA_CPU_ALWAYS_INLINE / BN_CUDA_CPU_INLINE; an out-of-line copy compiled for the
// baseline, called from v3 code, would read its vectors from the wrong place). -Wpsabi is
// silenced for that reason; GCC still prints some of its ABI notes for the out-of-line copies it
// emits and never calls, which are harmless.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BN_CUDA_CPU_DISPATCH 1
#define BN_CUDA_CPU_TARGET_V3 __attribute__((target("arch=x86-64-v3")))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define BN_CUDA_CPU_DISPATCH 0
#define BN_CUDA_CPU_TARGET_V3
#endif
#define BN_CUDA_CPU_INLINE inline __attribute__((always_inline))
#define BN_CUDA_CPU_ALWAYS_INLINE __attribute__((always_inline))  // for lambdas

namespace bn_cuda {

enum class Isa { kBaseline, kV3 };

// The version the loops run: kV3 where the CPU has x86-64-v3 and BN_CUDA_CPU_ISA is not
// "baseline". Decided on first use.
inline Isa selected_isa() {
#if BN_CUDA_CPU_DISPATCH
  static const Isa isa = [] {
    const char* env = std::getenv("BN_CUDA_CPU_ISA");
    if (env != nullptr && std::strcmp(env, "baseline") == 0) return Isa::kBaseline;
    return __builtin_cpu_supports("x86-64-v3") ? Isa::kV3 : Isa::kBaseline;
  }();
  return isa;
#else
  return Isa::kBaseline;
#endif
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kV3 ? "x86-64-v3" : "baseline";
}

template <Isa kIsa>
struct IsaTag {
  static constexpr Isa value = kIsa;
};

// body(IsaTag<kIsa>{}) compiled for kIsa: body must be an always-inline lambda, so that it and
// the loop it calls are compiled into these functions, with their target.
template <typename Body>
BN_CUDA_CPU_TARGET_V3 void run_v3(const Body& body) {
  body(IsaTag<Isa::kV3>{});
}
template <typename Body>
void run_baseline(const Body& body) {
  body(IsaTag<Isa::kBaseline>{});
}
template <typename Body>
BN_CUDA_CPU_INLINE void run_selected(const Body& body) {
  if (BN_CUDA_CPU_DISPATCH && selected_isa() == Isa::kV3) {
    run_v3(body);
  } else {
    run_baseline(body);
  }
}

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// 32 bytes of acc_t as a GCC/Clang vector type. Not at::vec::Vectorized: in an extension compiled
// for the baseline ISA, Vectorized is its generic std::array version, which GCC keeps on the
// stack; plain vector types stay in registers (one AVX register in the x86-64-v3 version, two SSE
// registers in the baseline one). Aggregates of vectors (std::array returns) are avoided for the
// same reason: GCC splits them through general-purpose registers.
template <typename acc_t>
struct RawVec;
template <>
struct RawVec<float> {
  typedef float type __attribute__((vector_size(32)));
};
template <>
struct RawVec<double> {
  typedef double type __attribute__((vector_size(32)));
};

// One float vector's worth (8 lanes) of 16-bit values and their 32-bit widenings: the storage
// of half and bfloat16, whose opmath is float.
typedef uint16_t U16 __attribute__((vector_size(16)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

template <typename V, typename U>
V bit_cast_vec(U u) {
  static_assert(sizeof(V) == sizeof(U));
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

template <typename scalar_t, Isa kIsa>
struct VecIO {
  using acc_t = opmath_t<scalar_t>;
  using Vec = typename RawVec<acc_t>::type;
  static constexpr int64_t kWidth = 32 / sizeof(acc_t);
  static constexpr int64_t kStep = 2 * kWidth;
  static constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;

  static Vec loadu(const acc_t* p) {
    Vec v;
    std::memcpy(&v, p, sizeof(Vec));
    return v;
  }
  static void storeu(acc_t* p, Vec v) { std::memcpy(p, &v, sizeof(Vec)); }

  // Loads kStep values starting at p.
  static void load(const scalar_t* p, Vec& lo, Vec& hi) {
    if constexpr (kReduced) {
      lo = widen(p);
      hi = widen(p + kWidth);
    } else {
      lo = loadu(p);
      hi = loadu(p + kWidth);
    }
  }

  // Writes the bytes of v (16 or 32) at p: a plain store, or with kStream (x86-64-v3 only) a
  // non-temporal one, which needs p aligned to sizeof(V).
  template <bool kStream, typename V>
  static void put(void* p, V v) {
    if constexpr (kStream) {
      static_assert(kIsa == Isa::kV3, "streaming stores: x86-64-v3 only");
      asm volatile("vmovntdq %1, %0" : "=m"(*static_cast<V*>(p)) : "x"(v));
    } else {
      std::memcpy(p, &v, sizeof(V));
    }
  }

  // Stores kStep values starting at p, rounded to scalar_t. kStream: by non-temporal stores,
  // p aligned to 32 bytes.
  template <bool kStream = false>
  static void store(scalar_t* p, Vec lo, Vec hi) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kIsa == Isa::kV3) {
      // Both halves rounded in 32-bit lanes, then packed to 16 bits by one pack and one permute
      // (the per-half narrowing spends more on packing each half with zeros than on rounding).
      // AVX512-BF16's vcvtneps2bf16 would be one instruction, but it flushes subnormals to zero.
      const U32 a = bf16_round(lo);
      const U32 b = bf16_round(hi);
      U16x16 out;
      asm("vpackusdw %2, %1, %0\n\tvpermq $0xd8, %0, %0" : "=x"(out) : "x"(a), "x"(b));
      put<kStream>(p, out);
    } else if constexpr (kReduced) {
      put<kStream>(p, narrow_bits(lo));
      put<kStream>(p + kWidth, narrow_bits(hi));
    } else {
      put<kStream>(p, lo);
      put<kStream>(p + kWidth, hi);
    }
  }

  // One value to opmath and back, for the scalar tails of the loops: as the vector conversions
  // below (F16C for half on v3: a short plane's tail would otherwise cost more than its vectors).
  static acc_t to_acc(scalar_t v) {
    if constexpr (std::is_same_v<scalar_t, c10::Half> && kIsa == Isa::kV3) {
      U16 bits{};
      bits[0] = v.x;
      F4 f;
      asm("vcvtph2ps %1, %0" : "=x"(f) : "x"(bits));
      return f[0];
    } else {
      return static_cast<acc_t>(v);
    }
  }
  static scalar_t from_acc(acc_t v) {
    if constexpr (std::is_same_v<scalar_t, c10::Half> && kIsa == Isa::kV3) {
      F4 f{};
      f[0] = v;
      U16 bits;
      asm("vcvtps2ph $0, %1, %0" : "=x"(bits) : "x"(f));
      return c10::Half(bits[0], c10::Half::from_bits());
    } else {
      return static_cast<scalar_t>(v);
    }
  }

  // Half and bfloat16 <-> float for kWidth values, with the results of c10::Half and
  // c10::BFloat16's conversions: exact widening, narrowing rounded to nearest even, NaN stays NaN.
  // Half on v3 uses F16C's instructions (written as inline assembly: the intrinsics would not
  // inline into the loop bodies, which are templates compiled for the baseline before they are
  // inlined into run_v3); otherwise, whole vectors of integer and float operations.
  static Vec widen(const scalar_t* p) {
    U16 bits;
    std::memcpy(&bits, p, sizeof(U16));
    if constexpr (std::is_same_v<scalar_t, c10::Half> && kIsa == Isa::kV3) {
      Vec v;
      asm("vcvtph2ps %1, %0" : "=x"(v) : "x"(bits));
      return v;
    }
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && kIsa == Isa::kV3) {
      Vec v;  // one zero-extension of all 8 lanes (the generic code below takes four instructions)
      asm("vpmovzxwd %1, %0\n\tvpslld $16, %0, %0" : "=x"(v) : "x"(bits));
      return v;
    }
    const U32 w = __builtin_convertvector(bits, U32) << 16;  // the 16 bits at the top of each lane
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return bit_cast_vec<Vec>(w);
    } else {
      static_assert(std::is_same_v<scalar_t, c10::Half>, "reduced types: half and bfloat16");
      // c10's fp16_ieee_to_fp32_value on 8 lanes: normals by rebiasing the exponent with one
      // multiply, subnormals by a magic-number subtraction; exact, as the scalar conversion.
      const U32 sign = w & 0x80000000u;
      const U32 two_w = w + w;
      const Vec normalized = bit_cast_vec<Vec>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
      const Vec denormalized = bit_cast_vec<Vec>((two_w >> 17) | (126u << 23)) - 0.5f;
      const U32 is_small = reinterpret_cast<U32>(two_w < (1u << 27));
      const U32 magnitude = (bit_cast_vec<U32>(denormalized) & is_small) | (bit_cast_vec<U32>(normalized) & ~is_small);
      return bit_cast_vec<Vec>(sign | magnitude);
    }
  }

  // c10::BFloat16's rounding of 8 floats, in the low 16 bits of 32-bit lanes: to nearest even,
  // NaN to 0x7FC0.
  static U32 bf16_round(Vec v) {
    U32 bits;
    std::memcpy(&bits, &v, sizeof(U32));
    const U32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    const U32 nan = reinterpret_cast<U32>(v != v);  // all ones in NaN lanes
    if constexpr (kIsa == Isa::kV3) {
      // One blend on the mask as it is: GCC's `nan ? a : b` first compares nan with zero.
      U32 out;
      asm("vpblendvb %3, %2, %1, %0" : "=x"(out) : "x"(rounded), "x"(U32{} + 0x7fc0u), "x"(nan));
      return out;
    } else {
      return nan ? U32{} + 0x7fc0u : rounded;
    }
  }

  // The kWidth values of v rounded to scalar_t, as bits.
  static U16 narrow_bits(Vec v) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return __builtin_convertvector(bf16_round(v), U16);
    } else if constexpr (kIsa == Isa::kV3) {
      // Immediate 0: round to nearest even (a NaN keeps a payload where the code below gives
      // 0x7E00; both are NaN).
      U16 out;
      asm("vcvtps2ph $0, %1, %0" : "=x"(out) : "x"(v));
      return out;
    } else {
      static_assert(std::is_same_v<scalar_t, c10::Half>, "reduced types: half and bfloat16");
      // c10's fp16_ieee_from_fp32_value on 8 lanes: the float adds round to nearest even at
      // half's precision (subnormals included); overflow gives inf, NaN gives 0x7E00.
      const U32 w = bit_cast_vec<U32>(v);
      const U32 shl1_w = w + w;
      const U32 sign = w & 0x80000000u;
      Vec base = (bit_cast_vec<Vec>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
      U32 bias = shl1_w & 0xFF000000u;
      bias = bias < 0x71000000u ? U32{} + 0x71000000u : bias;
      base = bit_cast_vec<Vec>((bias >> 1) + 0x07800000u) + base;
      const U32 rounded = bit_cast_vec<U32>(base);
      const U32 nonsign = ((rounded >> 13) & 0x00007C00u) + (rounded & 0x00000FFFu);
      const U32 is_nan = reinterpret_cast<U32>(shl1_w > 0xFF000000u);
      const U32 out32 = (sign >> 16) | (is_nan & 0x7E00u) | (~is_nan & nonsign);
      return __builtin_convertvector(out32, U16);
    }
  }
};

// A per-channel coefficient as an operation sees it: `at<T>(i)` gives lanes [i, i + width of T),
// T a vector or a scalar. Scalar: the run is one channel, every lane gets the same value.
// PerLane: the run is a channels-last row, lane i is channel i.
template <typename acc_t>
struct Scalar {
  using Vec = typename RawVec<acc_t>::type;
  acc_t value;
  Vec splat;  // value in every lane, made once: the baseline builds it through the stack
  Scalar(acc_t v) : value(v), splat(Vec{} + v) {}
  template <typename T>
  BN_CUDA_CPU_INLINE T at(int64_t) const {
    if constexpr (std::is_same_v<T, acc_t>) {
      return value;
    } else {
      return splat;
    }
  }
};

template <typename acc_t>
struct PerLane {
  const acc_t* values;
  template <typename T>
  BN_CUDA_CPU_INLINE T at(int64_t i) const {
    if constexpr (std::is_same_v<T, acc_t>) {
      return values[i];
    } else {
      T v;
      std::memcpy(&v, values + i, sizeof(T));
      return v;
    }
  }
};

// Each loop below is a body template, compiled for each ISA by its wrapper through
// run_selected.

// A map_run step hook that does nothing.
struct NoStepHook {
  BN_CUDA_CPU_INLINE void operator()(int64_t) const {}
};

// out[i] = op(i, a[i], b[i]) for i in [0, n); the whole steps by non-temporal stores where
// kStream (out then 32-byte aligned), the scalar tail by plain ones. before_step(i) runs before
// each whole step (an always-inline lambda: map_cached_rows' prefetch).
template <Isa kIsa, bool kHasB, bool kStream, typename scalar_t, typename Op, typename StepHook = NoStepHook>
BN_CUDA_CPU_INLINE void map_run(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, const Op& op,
                                const StepHook& before_step = {}) {
  using IO = VecIO<scalar_t, kIsa>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    before_step(i);
    Vec a0, a1, b0{}, b1{};
    IO::load(a + i, a0, a1);
    if constexpr (kHasB) IO::load(b + i, b0, b1);
    IO::template store<kStream>(out + i, op(i, a0, b0), op(i + IO::kWidth, a1, b1));
  }
  for (; i < n; ++i) {
    const acc_t bi = kHasB ? IO::to_acc(b[i]) : acc_t(0);
    out[i] = IO::from_acc(op(i, IO::to_acc(a[i]), bi));
  }
}

// out[i] = op(i, a[i], b[i]) for i in [0, n) of each of `segs` runs, run s starting at
// s * stride (stride may be negative: the runs are walked in the order given); b is read only
// when kHasB. One call covers many short runs (a channel's planes of 7x7 values), so the call
// and loop setup are paid once. kStream (x86-64-v3): each run that starts on a 64-byte line of
// out is written by non-temporal stores (except a scalar tail), the others by plain ones;
// callers stream only outputs whose runs are whole lines, so that no line mixes the two, and
// fence them (with_stream). hook_at(o) gives the map_run step hook of the run at offset o
// (map_cached_rows' prefetch; by default none).
struct NoRunHook {
  BN_CUDA_CPU_INLINE NoStepHook operator()(int64_t) const { return {}; }
};

template <Isa kIsa, bool kHasB, bool kStream, typename scalar_t, typename Op, typename RunHook = NoRunHook>
BN_CUDA_CPU_INLINE void map_segments_body(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t stride,
                                          int64_t segs, int64_t n, const Op& op, const RunHook& hook_at = {}) {
  static_assert(VecIO<scalar_t, kIsa>::kStep * sizeof(scalar_t) % 32 == 0, "steps keep 32-byte alignment");
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t o = s * stride;
    if (kStream && reinterpret_cast<uintptr_t>(out + o) % 64 == 0) {
      map_run<kIsa, kHasB, kStream>(a + o, b + o, out + o, n, op, hook_at(o));
    } else {
      map_run<kIsa, kHasB, false>(a + o, b + o, out + o, n, op, hook_at(o));
    }
  }
}

// How far ahead map_cached_rows prefetches, in bytes of memory order. Measured on the
// channels-last training forward (float, 2 threads, the normalization right after the statistics
// read x): 512 B to 4 KiB all within noise of each other.
constexpr int64_t kCachedRowsPrefetchBytes = 1024;

// out[r * n + i] = op(i, a[r * n + i], b[r * n + i]) for the `rows` rows of n values of one
// contiguous channels-last block (lane i is channel i), b read only when kHasB: a block its
// caller has just read whole, so that it sits in L2 and L3, not in memory. Each step prefetches
// the values kCachedRowsPrefetchBytes ahead in memory order, within the block, with the
// non-temporal hint (PREFETCHNTA): lines that come from L3 that way do not displace the
// per-channel coefficients and the output's lines from L1 and L2, and leave the caches when L1
// drops them. On the 2-thread EPYC VM, op alone against the plain loop
// (scripts/compare_builds.sh, 3-13 MB): channels-last training forward 10-20% faster over 128 to
// 2048 channels, backward 17-39%; a T0 prefetch was not faster. The training forward's x is then
// gone from the caches: a backward run right after its forward (the bench's forward+backward)
// reads it from memory, ~10% slower in one process at 3-13 MB. Inside a network other layers run
// between a layer's forward and its backward, which then reads x from memory either way.
// PREFETCHT2 for the forward kept x but bought only ~5% there (bench rows at 12.8 MB: 1.01-1.08x
// of eager against 1.29-1.39x with NTA, bench/results/cpu-amd-epyc-2t/forward-prefetch-hint).
// Where x comes from memory the hint was 5-10% slower, which is why only a pass that re-reads
// takes this loop. kStream: as in map_segments_body, the rows that start on a 64-byte line of out
// are written by non-temporal stores (the backward's dx of 8 to 16 MiB, see
// kStreamGradInputMinBytes in batch_norm.cpp), which leave the caches to the x and dy re-read.
template <Isa kIsa, bool kHasB, bool kStream, typename scalar_t, typename Op>
BN_CUDA_CPU_INLINE void map_cached_rows_body(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t rows,
                                             int64_t n, const Op& op) {
  constexpr int64_t distance = kCachedRowsPrefetchBytes / static_cast<int64_t>(sizeof(scalar_t));
  const int64_t prefetch_end = rows * n - distance;
  // The rows are consecutive runs of the block (stride n); each step of the row at o prefetches
  // ahead of its position o + i in the block.
  map_segments_body<kIsa, kHasB, kStream>(a, b, out, n, rows, n, op, [&](int64_t o) __attribute__((always_inline)) {
    return [&, o](int64_t i) __attribute__((always_inline)) {
      if (o + i < prefetch_end) {
        __builtin_prefetch(a + o + i + distance, 0, 0);
        if constexpr (kHasB) __builtin_prefetch(b + o + i + distance, 0, 0);
      }
    };
  });
}

// Orders the non-temporal stores of a streaming map (map_segments, map_planes, map_cached_rows)
// before the stores that follow (the end of a parallel task), so that whoever reads the output
// next sees them.
BN_CUDA_CPU_INLINE void stream_fence() {
#if BN_CUDA_CPU_DISPATCH
  asm volatile("sfence" ::: "memory");
#endif
}

// body(std::true_type{}) and a fence where `stream` and kIsa is x86-64-v3 (the version with
// non-temporal stores), else body(std::false_type{}): a streaming loop is only instantiated where
// it can run.
template <Isa kIsa, typename Body>
BN_CUDA_CPU_INLINE void with_stream(bool stream, const Body& body) {
  if constexpr (kIsa == Isa::kV3) {
    if (stream) {
      body(std::true_type{});
      stream_fence();
      return;
    }
  }
  body(std::false_type{});
}

// `stream` as in map_segments below (callers stream whole-line rows only).
template <bool kHasB, typename scalar_t, typename Op>
void map_cached_rows(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t rows, int64_t n, const Op& op,
                     bool stream) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    constexpr Isa kIsa = decltype(isa)::value;
    const Op op_ = op;  // a local copy stays in registers across the stores (see map_planes)
    with_stream<kIsa>(stream, [&](auto streamed) __attribute__((always_inline)) {
      map_cached_rows_body<kIsa, kHasB, decltype(streamed)::value>(a, b, out, rows, n, op_);
    });
  });
}

// `stream`: write out with non-temporal stores where the CPU runs the x86-64-v3 loops (for an
// output larger than the caches, see streams_output in batch_norm.cpp: plain stores first read
// every line of out into the cache, a third of the pass's memory traffic).
template <bool kHasB, typename scalar_t, typename Op>
void map_segments(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t stride, int64_t segs, int64_t n,
                  const Op& op, bool stream = false) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    constexpr Isa kIsa = decltype(isa)::value;
    const Op op_ = op;  // a local copy stays in registers across the stores (see map_planes)
    with_stream<kIsa>(stream, [&](auto streamed) __attribute__((always_inline)) {
      map_segments_body<kIsa, kHasB, decltype(streamed)::value>(a, b, out, stride, segs, n, op_);
    });
  });
}

// Channels-first planes s in [s0, s1), L values each at s * L, plane s of channel s % C:
// out = make_op(c)(i, a, b) over each plane. make_op must be an always-inline lambda: it is
// compiled into the loop, so a plane's setup is a few broadcasts, and one call covers all the
// planes of a task (a 7x7 plane is only 49 values: a call and setup per plane cost more than its
// arithmetic).
template <bool kHasB, typename scalar_t, typename MakeOp>
void map_planes(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t L, int64_t C, int64_t s0, int64_t s1,
                const MakeOp& make_op, bool stream = false) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    constexpr Isa kIsa = decltype(isa)::value;
    // Local copies of the arguments and of make_op (which should capture by value): the loop's
    // stores go through memcpy and so may alias any memory as far as the compiler knows, which
    // made it reload every captured reference, and make_op's captures, once per plane.
    const scalar_t* const a_ = a;
    const scalar_t* const b_ = b;
    scalar_t* const out_ = out;
    const int64_t L_ = L, C_ = C, end = s1;
    const MakeOp make = make_op;
    with_stream<kIsa>(stream, [&](auto streamed) __attribute__((always_inline)) {
      int64_t c = s0 % C_;
      for (int64_t s = s0; s < end; ++s) {
        map_segments_body<kIsa, kHasB, decltype(streamed)::value>(a_ + s * L_, kHasB ? b_ + s * L_ : b_,
                                                                  out_ + s * L_, 0, 1, L_, make(c));
        if (++c == C_) c = 0;
      }
    });
  });
}

// Reductions: op(i, x, g, acc) adds its K terms into acc[0..K) (T acc[K]).

// The steps every reduction below is made of: op's terms for the kStep values at a + o (and
// b + o), added into lo (the first kWidth) and hi, whose first lane is i ...
template <typename IO, bool kHasB, typename scalar_t, typename Op, typename Vec>
BN_CUDA_CPU_INLINE void add_step(const scalar_t* a, const scalar_t* b, int64_t o, int64_t i, const Op& op, Vec* lo,
                                 Vec* hi) {
  Vec a0, a1, b0{}, b1{};
  IO::load(a + o, a0, a1);
  if constexpr (kHasB) IO::load(b + o, b0, b1);
  op(i, a0, b0, lo);
  op(i + IO::kWidth, a1, b1, hi);
}

// ... and op's terms for the single value at a + o, lane i, added into t.
template <typename IO, bool kHasB, typename scalar_t, typename Op, typename T>
BN_CUDA_CPU_INLINE void add_value(const scalar_t* a, const scalar_t* b, int64_t o, int64_t i, const Op& op, T* t) {
  using acc_t = typename IO::acc_t;
  const acc_t bi = kHasB ? IO::to_acc(b[o]) : acc_t(0);
  op(i, IO::to_acc(a[o]), bi, t);
}

// The lanes of v as 4 doubles: a float vector's two halves widened and added, a double vector as
// it is (the step from a run's opmath sums to double accumulators).
template <typename Vec>
BN_CUDA_CPU_INLINE typename RawVec<double>::type lanes_as_double(Vec v) {
  using Wide = typename RawVec<double>::type;
  if constexpr (std::is_same_v<Vec, Wide>) {
    return v;
  } else {
    return __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3), Wide) +
           __builtin_convertvector(__builtin_shufflevector(v, v, 4, 5, 6, 7), Wide);
  }
}

// The K sums of op's terms over i in [0, n) of each of `segs` runs (run s at s * stride), in
// vector accumulators kept across the runs. kDoubleAcrossRuns = false: in opmath throughout.
// kDoubleAcrossRuns = true: each run is summed in opmath and its lanes are added into double
// accumulators at its end (float sums only as long as a run; the result is double). Lanes are
// added in a fixed order, so the result depends only on the values.
// prefetch != 0: each line read at p is followed by a prefetch of p + prefetch (the values read
// next, where the runs are too short and far apart for the hardware prefetchers: the next
// channel's 7x7 planes).
template <Isa kIsa, int K, bool kHasB, bool kDoubleAcrossRuns, typename scalar_t, typename Op>
BN_CUDA_CPU_INLINE auto sum_segments_body(const scalar_t* a, const scalar_t* b, int64_t stride, int64_t segs,
                                          int64_t n, const Op& op, int64_t prefetch) {
  using IO = VecIO<scalar_t, kIsa>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using total_t = std::conditional_t<kDoubleAcrossRuns, double, acc_t>;
  // Double accumulators of the runs' float sums (used when acc_t is float and kDoubleAcrossRuns).
  using Wide = typename RawVec<double>::type;
  constexpr bool kFold = kDoubleAcrossRuns && !std::is_same_v<acc_t, double>;
  Vec lo[K] = {}, hi[K] = {};
  acc_t tail[K] = {};
  Wide wide[K] = {};
  double wide_tail[K] = {};
  for (int64_t s = 0; s < segs; ++s) {
    const int64_t o = s * stride;
    int64_t i = 0;
    for (; i + IO::kStep <= n; i += IO::kStep) {
      if (prefetch != 0) {
        __builtin_prefetch(a + o + i + prefetch);
        if constexpr (kHasB) __builtin_prefetch(b + o + i + prefetch);
      }
      add_step<IO, kHasB>(a, b, o + i, i, op, lo, hi);
    }
    for (; i < n; ++i) add_value<IO, kHasB>(a, b, o + i, i, op, tail);
    if constexpr (kFold) {
      for (int k = 0; k < K; ++k) {
        const Vec v = lo[k] + hi[k];
        wide[k] += lanes_as_double(v);
        wide_tail[k] += tail[k];
        lo[k] = hi[k] = Vec{};
        tail[k] = 0;
      }
    }
  }
  std::array<total_t, K> total{};
  for (int k = 0; k < K; ++k) {
    if constexpr (kFold) {
      for (int j = 0; j < 4; ++j) total[k] += wide[k][j];
      total[k] += wide_tail[k];
    } else {
      acc_t buf[IO::kWidth];
      IO::storeu(buf, lo[k] + hi[k]);
      for (int64_t j = 0; j < IO::kWidth; ++j) total[k] += buf[j];
      total[k] += tail[k];
    }
  }
  return total;
}

template <int K, bool kHasB, bool kDoubleAcrossRuns = false, typename scalar_t, typename Op>
auto sum_segments(const scalar_t* a, const scalar_t* b, int64_t stride, int64_t segs, int64_t n, const Op& op,
                  int64_t prefetch = 0) {
  std::array<std::conditional_t<kDoubleAcrossRuns, double, opmath_t<scalar_t>>, K> total;
  run_selected([&](auto isa) __attribute__((always_inline)) {
    total = sum_segments_body<decltype(isa)::value, K, kHasB, kDoubleAcrossRuns>(a, b, stride, segs, n, op, prefetch);
  });
  return total;
}

// Per-channel sums over channels-first planes read in memory order: for each image n < N in
// turn, the planes of channels [c0, c1) (plane (n, c): the L values at (n * C + c) * L, and those
// of b at the same offsets), with op = make_op(c). A plane's K sums of op's terms are taken in
// opmath and added into double accumulators of its channel (float sums only as long as a plane,
// as sum_segments' kDoubleAcrossRuns); totals[k * (c1 - c0) + c - c0] = channel c's sum k over
// its N planes. Read this way a task's planes are N long sequential runs, which the hardware
// prefetchers follow; a channel at a time, short planes (7x7: 196 bytes) lie a whole image apart
// and came from memory at about a third of that speed. A channel's planes are added in image
// order and the lanes in a fixed order, so the sums depend only on the values, not on how the
// channels are split into tasks. make_op must be an always-inline lambda capturing by value (see
// map_planes).
template <Isa kIsa, int K, bool kHasB, typename scalar_t, typename MakeOp>
BN_CUDA_CPU_INLINE void sum_planes_body(const scalar_t* a, const scalar_t* b, int64_t N, int64_t C, int64_t L,
                                        int64_t c0, int64_t c1, const MakeOp& make_op, double* totals) {
  using IO = VecIO<scalar_t, kIsa>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  using Wide = typename RawVec<double>::type;
  // Per channel: K double vectors (4 lanes each), then K double tails.
  constexpr int64_t kSlot = 5 * K;
  // Local copies (see map_planes): the accumulators' stores may alias anything.
  const scalar_t* const a_ = a;
  const scalar_t* const b_ = b;
  const int64_t N_ = N, C_ = C, L_ = L, first = c0, channels = c1 - c0;
  const MakeOp make = make_op;
  const std::unique_ptr<double[]> acc(new double[channels * kSlot]());
  for (int64_t n = 0; n < N_; ++n) {
    const int64_t o0 = (n * C_ + first) * L_;
    for (int64_t j = 0; j < channels; ++j) {
      const auto op = make(first + j);
      const int64_t o = o0 + j * L_;
      Vec lo[K] = {}, hi[K] = {};
      acc_t tail[K] = {};
      int64_t i = 0;
      for (; i + IO::kStep <= L_; i += IO::kStep) add_step<IO, kHasB>(a_, b_, o + i, i, op, lo, hi);
      for (; i < L_; ++i) add_value<IO, kHasB>(a_, b_, o + i, i, op, tail);
      double* const slot = acc.get() + j * kSlot;
      for (int k = 0; k < K; ++k) {
        const Vec v = lo[k] + hi[k];
        Wide w;
        std::memcpy(&w, slot + 4 * k, sizeof(Wide));
        w += lanes_as_double(v);
        std::memcpy(slot + 4 * k, &w, sizeof(Wide));
        slot[4 * K + k] += tail[k];
      }
    }
  }
  for (int64_t j = 0; j < channels; ++j) {
    const double* const slot = acc.get() + j * kSlot;
    for (int k = 0; k < K; ++k) {
      double total = 0;
      for (int l = 0; l < 4; ++l) total += slot[4 * k + l];
      totals[k * channels + j] = total + slot[4 * K + k];
    }
  }
}

template <int K, bool kHasB, typename scalar_t, typename MakeOp>
void sum_planes(const scalar_t* a, const scalar_t* b, int64_t N, int64_t C, int64_t L, int64_t c0, int64_t c1,
                const MakeOp& make_op, double* totals) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    sum_planes_body<decltype(isa)::value, K, kHasB>(a, b, N, C, L, c0, c1, make_op, totals);
  });
}

// Where accumulate_rows may prefetch up to: `limit` is the offset from a (and b) where the values
// that its caller reads in this pass end (a prefetch past them would fetch lines nobody reads).
struct PrefetchAhead {
  int64_t limit = 0;
};

// How far ahead of its reads accumulate_rows prefetches, in bytes of memory order. Measured in a
// standalone copy of the loop (1 thread, 12.8 MB from memory, 4 rows per load): 32-128 KiB all
// beat prefetching the next block as one run (C = 2048: ~770 -> ~510-550 us, C = 1024 ~660 ->
// ~500, C = 512 ~655 -> ~570; C <= 256 within noise), 8-16 KiB did not at C >= 1024.
constexpr int64_t kPrefetchDistanceBytes = 65536;

// acc[k][i] += the sum of op's term k over rows r < rows at column i, for i in [0, n): per-lane
// sums along channels-last rows, row r starting at r * row_stride. The rows come from memory, so
// they are read whole, in order, kRowsPerLoad at a time per load and store of the sums; one call
// covers a whole block of rows (a row of 64 channels is only 4 steps: a call per row cost more
// than its arithmetic). Read in this order, rows of many channels reach the hardware prefetchers
// as short interleaved streams that they follow badly (about half the speed of a plain sum from
// memory at 256 channels, slower still at 2048): each step prefetches the line a fixed distance
// past the one it reads, in memory order, up to `ahead.limit`. Each lane adds its rows in row
// order.
template <Isa kIsa, int K, bool kHasB, typename scalar_t, typename Op>
BN_CUDA_CPU_INLINE void accumulate_rows_body(const scalar_t* a, const scalar_t* b, int64_t row_stride, int64_t rows,
                                             int64_t n, const Op& op, opmath_t<scalar_t>* const* acc,
                                             PrefetchAhead ahead) {
  using IO = VecIO<scalar_t, kIsa>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  constexpr int64_t kRowsPerLoad = 4;
  constexpr int64_t kLine = 64;
  // Steps per 64-byte line: a step of 16-bit values is half a line, prefetched once.
  constexpr int64_t kStepsPerLine =
      std::max<int64_t>(1, kLine / (IO::kStep * static_cast<int64_t>(sizeof(scalar_t))));
  constexpr int64_t distance = kPrefetchDistanceBytes / static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerLoad) {
    const int64_t r1 = std::min(rows, r0 + kRowsPerLoad);
    int64_t i = 0;
    for (; i + IO::kStep <= n; i += IO::kStep) {
      Vec lo[K], hi[K];
      for (int k = 0; k < K; ++k) {
        lo[k] = IO::loadu(acc[k] + i);
        hi[k] = IO::loadu(acc[k] + i + IO::kWidth);
      }
      const bool prefetch = (i / IO::kStep) % kStepsPerLine == 0;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t ahead_offset = r * row_stride + i + distance;
        if (prefetch && ahead_offset < ahead.limit) {
          __builtin_prefetch(a + ahead_offset, 0, 2);
          if constexpr (kHasB) __builtin_prefetch(b + ahead_offset, 0, 2);
        }
        add_step<IO, kHasB>(a, b, r * row_stride + i, i, op, lo, hi);
      }
      for (int k = 0; k < K; ++k) {
        IO::storeu(acc[k] + i, lo[k]);
        IO::storeu(acc[k] + i + IO::kWidth, hi[k]);
      }
    }
    for (; i < n; ++i) {
      acc_t t[K];
      for (int k = 0; k < K; ++k) t[k] = acc[k][i];
      for (int64_t r = r0; r < r1; ++r) add_value<IO, kHasB>(a, b, r * row_stride + i, i, op, t);
      for (int k = 0; k < K; ++k) acc[k][i] = t[k];
    }
  }
}

template <int K, bool kHasB, typename scalar_t, typename Op>
void accumulate_rows(const scalar_t* a, const scalar_t* b, int64_t row_stride, int64_t rows, int64_t n, const Op& op,
                     opmath_t<scalar_t>* const* acc, PrefetchAhead ahead = {}) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    accumulate_rows_body<decltype(isa)::value, K, kHasB>(a, b, row_stride, rows, n, op, acc, ahead);
  });
}

// acc[k][i] = the sum of op's term k over rows r < rows at column i, for i in [0, n): per-lane
// sums down a channels-last block whose row r starts at r * row_stride. Columns go in tiles of
// kStep values whose sums stay in registers all the way down (two sets, for even and odd rows,
// so that consecutive rows' adds do not wait on each other), instead of being loaded and stored
// every few rows as accumulate_rows does: for a block that sits in L2 this is several times faster.
// Each lane's sum is over the rows in a fixed order, so the result depends only on the values.
template <Isa kIsa, int K, bool kHasB, typename scalar_t, typename Op>
BN_CUDA_CPU_INLINE void sum_rows_body(const scalar_t* a, const scalar_t* b, int64_t row_stride, int64_t rows,
                                      int64_t n, const Op& op, opmath_t<scalar_t>* const* acc) {
  using IO = VecIO<scalar_t, kIsa>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec lo0[K] = {}, hi0[K] = {}, lo1[K] = {}, hi1[K] = {};
    const auto add_row = [&](int64_t r, Vec* lo, Vec* hi) __attribute__((always_inline)) {
      add_step<IO, kHasB>(a, b, r * row_stride + i, i, op, lo, hi);
    };
    int64_t r = 0;
    for (; r + 2 <= rows; r += 2) {
      add_row(r, lo0, hi0);
      add_row(r + 1, lo1, hi1);
    }
    if (r < rows) add_row(r, lo0, hi0);
    for (int k = 0; k < K; ++k) {
      IO::storeu(acc[k] + i, lo0[k] + lo1[k]);
      IO::storeu(acc[k] + i + IO::kWidth, hi0[k] + hi1[k]);
    }
  }
  for (; i < n; ++i) {
    acc_t t[K] = {};
    for (int64_t r = 0; r < rows; ++r) add_value<IO, kHasB>(a, b, r * row_stride + i, i, op, t);
    for (int k = 0; k < K; ++k) acc[k][i] = t[k];
  }
}

template <int K, bool kHasB, typename scalar_t, typename Op>
void sum_rows(const scalar_t* a, const scalar_t* b, int64_t row_stride, int64_t rows, int64_t n, const Op& op,
              opmath_t<scalar_t>* const* acc) {
  run_selected([&](auto isa) __attribute__((always_inline)) {
    sum_rows_body<decltype(isa)::value, K, kHasB>(a, b, row_stride, rows, n, op, acc);
  });
}

}  // namespace bn_cuda
