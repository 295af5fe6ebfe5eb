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

#include <array>
#include <cstdint>
#include <cstring>
#include <type_traits>

// The loops are compiled for baseline x86-64 and, with GCC, also for x86-64-v3 (AVX2, FMA, F16C);
// the dynamic loader picks the clone the CPU supports (ifunc), so no user needs AVX2 and users
// who have it get 256-bit vectors: ~2x the baseline's throughput on cache-resident tensors.
// -Wpsabi only warns that 32-byte vector arguments have a different ABI with and without AVX:
// the operations that take them are lambdas inlined into these loops, never called across ISAs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BN_CUDA_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define BN_CUDA_CPU_CLONES
#endif

// _Float16 vectors (GCC >= 12, Clang) convert half <-> float with F16C where the clone has it.
#if defined(__FLT16_MAX__) && (defined(__x86_64__) || defined(__aarch64__))
#define BN_CUDA_HAS_FLOAT16 1
#else
#define BN_CUDA_HAS_FLOAT16 0
#endif

namespace bn_cuda {

template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// 32 bytes of acc_t as a GCC/Clang vector type. Not at::vec::Vectorized: in an extension compiled
// for the baseline ISA, Vectorized is its generic std::array version, which GCC keeps on the
// stack; plain vector types stay in registers (one AVX register in the x86-64-v3 clone, two SSE
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
typedef uint32_t U32 __attribute__((vector_size(32)));
#if BN_CUDA_HAS_FLOAT16
typedef _Float16 F16 __attribute__((vector_size(16)));
#endif

template <typename scalar_t>
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

  // Stores kStep values starting at p, rounded to scalar_t.
  static void store(scalar_t* p, Vec lo, Vec hi) {
    if constexpr (kReduced) {
      narrow(p, lo);
      narrow(p + kWidth, hi);
    } else {
      storeu(p, lo);
      storeu(p + kWidth, hi);
    }
  }

  // Half and bfloat16 <-> float for kWidth values, as whole vectors (one vpmovzxwd + shift for
  // bfloat16, vcvtph2ps / vcvtps2ph for half in the x86-64-v3 clone) with the rounding of
  // c10::Half and c10::BFloat16: round to nearest even, NaN stays NaN.
  static Vec widen(const scalar_t* p) {
    Vec v;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      U16 bits;
      std::memcpy(&bits, p, sizeof(U16));
      const U32 wide = __builtin_convertvector(bits, U32) << 16;
      std::memcpy(&v, &wide, sizeof(Vec));
#if BN_CUDA_HAS_FLOAT16
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      F16 h;
      std::memcpy(&h, p, sizeof(F16));
      v = __builtin_convertvector(h, Vec);
#endif
    } else {
      acc_t buf[kWidth];
      for (int64_t j = 0; j < kWidth; ++j) buf[j] = static_cast<acc_t>(p[j]);
      v = loadu(buf);
    }
    return v;
  }

  static void narrow(scalar_t* p, Vec v) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      U32 bits;
      std::memcpy(&bits, &v, sizeof(U32));
      U32 rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
      const U32 nan = reinterpret_cast<U32>(v != v);  // all ones in NaN lanes
      rounded = (rounded & ~nan) | (nan & 0x7fc0u);
      const U16 out = __builtin_convertvector(rounded, U16);
      std::memcpy(p, &out, sizeof(U16));
#if BN_CUDA_HAS_FLOAT16
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      const F16 h = __builtin_convertvector(v, F16);
      std::memcpy(p, &h, sizeof(F16));
#endif
    } else {
      acc_t buf[kWidth];
      storeu(buf, v);
      for (int64_t j = 0; j < kWidth; ++j) p[j] = static_cast<scalar_t>(buf[j]);
    }
  }
};

// A per-channel coefficient as an operation sees it: `at<T>(i)` gives lanes [i, i + width of T),
// T a vector or a scalar. Scalar: the run is one channel, every lane gets the same value.
// PerLane: the run is a channels-last row, lane i is channel i.
template <typename acc_t>
struct Scalar {
  acc_t value;
  template <typename T>
  T at(int64_t) const {
    return T{} + value;
  }
};

template <typename acc_t>
struct PerLane {
  const acc_t* values;
  template <typename T>
  T at(int64_t i) const {
    if constexpr (std::is_same_v<T, acc_t>) {
      return values[i];
    } else {
      T v;
      std::memcpy(&v, values + i, sizeof(T));
      return v;
    }
  }
};

// out[i] = op(i, a[i], b[i]) for i in [0, n); b is read only when kHasB.
template <bool kHasB, typename scalar_t, typename Op>
BN_CUDA_CPU_CLONES void map_run(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n, const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a0, a1, b0{}, b1{};
    IO::load(a + i, a0, a1);
    if constexpr (kHasB) IO::load(b + i, b0, b1);
    IO::store(out + i, op(i, a0, b0), op(i + IO::kWidth, a1, b1));
  }
  for (; i < n; ++i) {
    const acc_t bi = kHasB ? static_cast<acc_t>(b[i]) : acc_t(0);
    out[i] = static_cast<scalar_t>(op(i, static_cast<acc_t>(a[i]), bi));
  }
}

// Reductions: op(i, x, g, acc) adds its K terms into acc[0..K) (T acc[K]).

// The K sums over i in [0, n) of op's terms, in opmath. Lanes are added in a fixed order, so the
// result depends only on the values.
template <int K, bool kHasB, typename scalar_t, typename Op>
BN_CUDA_CPU_CLONES std::array<opmath_t<scalar_t>, K> sum_run(const scalar_t* a, const scalar_t* b, int64_t n,
                                                              const Op& op) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  Vec lo[K] = {}, hi[K] = {};
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a0, a1, b0{}, b1{};
    IO::load(a + i, a0, a1);
    if constexpr (kHasB) IO::load(b + i, b0, b1);
    op(i, a0, b0, lo);
    op(i + IO::kWidth, a1, b1, hi);
  }
  acc_t tail[K] = {};
  for (; i < n; ++i) {
    const acc_t bi = kHasB ? static_cast<acc_t>(b[i]) : acc_t(0);
    op(i, static_cast<acc_t>(a[i]), bi, tail);
  }
  std::array<acc_t, K> total{};
  for (int k = 0; k < K; ++k) {
    acc_t buf[IO::kWidth];
    IO::storeu(buf, lo[k] + hi[k]);
    for (int64_t j = 0; j < IO::kWidth; ++j) total[k] += buf[j];
    total[k] += tail[k];
  }
  return total;
}

// acc[k][i] += op's term k for i in [0, n): per-lane sums along a channels-last row.
template <int K, bool kHasB, typename scalar_t, typename Op>
BN_CUDA_CPU_CLONES void accumulate_row(const scalar_t* a, const scalar_t* b, int64_t n, const Op& op,
                                       opmath_t<scalar_t>* const* acc) {
  using IO = VecIO<scalar_t>;
  using acc_t = typename IO::acc_t;
  using Vec = typename IO::Vec;
  acc_t* dst[K];
  for (int k = 0; k < K; ++k) dst[k] = acc[k];
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    Vec a0, a1, b0{}, b1{};
    IO::load(a + i, a0, a1);
    if constexpr (kHasB) IO::load(b + i, b0, b1);
    Vec lo[K], hi[K];
    for (int k = 0; k < K; ++k) {
      lo[k] = IO::loadu(dst[k] + i);
      hi[k] = IO::loadu(dst[k] + i + IO::kWidth);
    }
    op(i, a0, b0, lo);
    op(i + IO::kWidth, a1, b1, hi);
    for (int k = 0; k < K; ++k) {
      IO::storeu(dst[k] + i, lo[k]);
      IO::storeu(dst[k] + i + IO::kWidth, hi[k]);
    }
  }
  for (; i < n; ++i) {
    const acc_t bi = kHasB ? static_cast<acc_t>(b[i]) : acc_t(0);
    acc_t t[K];
    for (int k = 0; k < K; ++k) t[k] = dst[k][i];
    op(i, static_cast<acc_t>(a[i]), bi, t);
    for (int k = 0; k < K; ++k) dst[k][i] = t[k];
  }
}

}  // namespace bn_cuda
