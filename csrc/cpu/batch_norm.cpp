// CPU kernels for the bn_cuda ops (contracts in csrc/ops.cpp); inner loops in vec_loops.h.
//
// Layouts (see ChannelView in op_checks.h):
//  - channels-first, memory (N, C, L): a channel is N contiguous segments of L values. Work is
//    split over channels. Long planes: each channel's statistics and its normalize / dx pass run
//    back to back while the channel's values are still in cache. Short planes (see
//    kMemoryOrderPlane): a task's channels are read image by image, in memory order, for their
//    statistics, then again for the normalize / dx pass.
//  - channels-last, memory (N*L rows, C columns): vectors run along C. Rows are split into fixed
//    blocks and groups of blocks (RowSplit); groups produce per-channel partials that are merged
//    in group order. A pass that follows a full read of the tensor walks the groups backwards,
//    so it starts on the rows the read left in cache.
// Statistics without per-element double arithmetic: values are shifted by a per-channel pivot
// (the channel's first value), and each chunk of about kChunk values (L1-resident) is reduced in
// float in two passes, the shifted sum, then the deviations e from the chunk's shifted mean
// (sum e and sum e^2, so the rounding of that mean cancels). Channels-last row blocks (L2) and
// short channels-first planes are read once where that is as safe (see channel_stats_nlc,
// plane_stats). Chunk states are merged in double
// with Chan's formula (welford.h). With |x - pivot| on the scale of the spread, the shift is
// exact and float sums of a few thousand values keep the variance well within the 1e-4 relative
// error tests/test_numerics.py allows at mean 1e5, std 1e-2. Backward sums are float over short
// runs (a channels-first run of at most kChunk values or one plane, kSumRows channels-last
// rows), double across them.
// Every split that orders a sum depends only on the shape, never on the thread count, and no
// per-channel result depends on which channels share a task, so results are bitwise
// reproducible with any number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/output_alloc.h"
#include "cpu/vec_loops.h"
#include "op_checks.h"
#include "welford.h"

namespace bn_cuda {
namespace {

using Welford = WelfordState<double>;

// Values per statistics chunk: the second pass over a chunk reads L1.
constexpr int64_t kChunk = 2048;
// Channels-last row blocks: about kBlockElements values (256 KiB of float), so the second pass
// over a block reads L2, and between kMinBlockRows (amortises the per-block zeroing and folding
// of the float sums when C is large) and kMaxBlockRows (bounds the length of each float sum when
// C is small) rows.
constexpr int64_t kBlockElements = 65536;
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlockRows = 256;
// Rows whose mean is the pivot of the channels-last statistics' one-pass sums.
constexpr int64_t kPivotRows = 16;
// Channels-first passes over whole channels take a task's channels image by image, in memory
// order (sum_planes, map_planes), where planes are shorter than kMemoryOrderPlane values, and a
// channel at a time otherwise: long planes are runs the prefetchers follow, and a channel is
// still in cache for its second pass. Short planes a channel at a time are pieces a whole image
// apart, read at about a third of the speed from memory. The training backward switches at
// kMemoryOrderBackwardPlane: a channel at a time it reads x and dy from memory once (dx follows
// from L1), in memory order twice, which costs more from planes of ~32x32 on (2 threads,
// 32x64x56x56: ~2.9 ms a channel at a time, ~3.1 ms in memory order; 32x256x28x28 the other
// way, ~3.2 against ~2.4 ms).
constexpr int64_t kMemoryOrderPlane = 4096;
constexpr int64_t kMemoryOrderBackwardPlane = 1024;
// One-pass moments stand where the squared shift of the sums' mean from their pivot is at most
// this share of the mean of d^2 (see channel_stats_nlc).
constexpr double kOnePassShift = 15.0 / 16.0;
// Rows per float partial of the channels-last backward sums (they need no second pass): with 16,
// zeroing and folding the partials cost ~5% of the reduction at 32x512x7x7.
constexpr int64_t kSumRows = 64;
// At most this many groups of blocks, each with its own per-channel partials.
constexpr int64_t kMaxGroups = 64;
// A split into fewer blocks than kMaxGroups uses a multiple of this many blocks where they stay
// at least kMinBlockRows / 2 long, in this many groups, so that 2, 4, 8 or 16 threads get equal
// shares (13 blocks on 2 threads: 7 and 6; 32x2048x7x7's 25 blocks of 64 rows: 13 and 12, now
// 32 blocks of 49 rows in 16 groups). Fewer groups also mean fewer per-group partials: each is
// 16 bytes per channel, written and read back once per call (at 32x2048x7x7, 25 groups wrote
// 800 KiB, 6% of the input's bytes; 16 groups write 512 KiB).
constexpr int64_t kBalancedBlocks = 16;
// Channels per task of the final merge of channels-last group states.
constexpr int64_t kMergeGrain = 256;
// Values per task of a purely elementwise pass.
constexpr int64_t kElementwiseGrain = 32768;
// The outputs of the elementwise passes: y (the normalized input) and dx (the input gradient).
enum class Output { kNormalized, kGradInput };

// y of at least this many bytes is written with non-temporal stores: a plain store first reads
// its line into the cache, a third of an elementwise pass's memory traffic, and an output larger
// than the last-level cache (32 MB on the machine measured) has left it before the next layer
// reads it anyway. A smaller one is worth keeping: 2 threads, training forward followed by an
// in-place ReLU of y, 32x64x56x56 float32 (25.7 MB) ~2.0 ms plain, ~2.5 ms streamed (the op
// alone about equal); 32x128x56x56 (51 MB) ~5.7 ms plain, ~5.1 ms streamed.
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;
// dx from this many bytes on: its reader is the backward of the layer before, in a CNN a
// convolution's, which spends far longer computing than reading dx, so a dx kept in cache buys
// little there, while the backward itself pays for the line reads of plain stores. Float, 2
// threads, against dx from 32 MiB (bench/results/cpu-amd-epyc-2t/builds/stream-grad-input.md, one
// process, interleaved), at 12.8 and 25.7 MB: channels-last backward 1.06-1.17x as fast, module
// forward+backward 1.04-1.10x; channels-first (whole-line planes) 1.14-1.34x and 1.14-1.20x.
// Streaming dx of 6.4 MB was even, of a 3.2 MB channels-last one 11% slower.
constexpr int64_t kStreamGradInputMinBytes = int64_t(8) << 20;

// The most MiB an override may name (larger ones are clamped: no output is that large).
constexpr int64_t kMaxStreamOverrideMiB = int64_t(1) << 30;

// MiB as BN_CUDA_CPU_STREAM_MB spells them: a whole number >= 0 (clamped), else -1 (no
// override: a typo must not stream every output).
int64_t parse_stream_mb(const char* text) {
  if (text == nullptr || *text == '\0') return -1;
  char* end = nullptr;
  const long long mb = std::strtoll(text, &end, 10);
  if (*end != '\0' || mb < 0) return -1;
  return std::min<int64_t>(mb, kMaxStreamOverrideMiB);
}

// Bytes from which both outputs stream instead of their bounds, or -1: BN_CUDA_CPU_STREAM_MB,
// read at the first call (0 streams every output, as the tests do, to cover the path on small
// tensors); set_cpu_stream_mb changes it in a running process.
std::atomic<int64_t>& stream_override_bytes() {
  static std::atomic<int64_t> bytes{[] {
    const int64_t mb = parse_stream_mb(std::getenv("BN_CUDA_CPU_STREAM_MB"));
    return mb < 0 ? int64_t(-1) : mb << 20;
  }()};
  return bytes;
}

int64_t stream_min_bytes(Output output) {
  const int64_t override_bytes = stream_override_bytes().load(std::memory_order_relaxed);
  if (override_bytes >= 0) return override_bytes;
  return output == Output::kGradInput ? kStreamGradInputMinBytes : kStreamMinBytes;
}

// Whether `output` of an elementwise pass over v (as large as x) is written with non-temporal
// stores: large enough, and its runs (channels-last rows, channels-first planes) whole 64-byte
// lines, so that streamed and plain stores never share a line (a partly written line leaves the
// write-combining buffer as a slower partial write).
bool streams_output(const ChannelView& v, Output output) {
  const int64_t element = static_cast<int64_t>(v.x.element_size());
  const int64_t run = (v.channels_last ? v.C : v.L) * element;
  return run % 64 == 0 && v.x.numel() * element >= stream_min_bytes(output);
}

// Whether a pass that re-reads x right after a full read of it (training forward's
// normalization, backward's dx) finds x in the caches: up to this size the channels-last passes
// read it through map_cached_rows. On the 2-thread EPYC VM (32 MB L3) the float training forward
// was 10-20% faster that way at 3-13 MB and mixed at 26 MB (from 15% faster to 11% slower by
// shape and run), where the output written beside x evicts much of it before it is re-read.
constexpr int64_t kRereadFromCacheMaxBytes = int64_t(16) << 20;

bool rereads_from_cache(const ChannelView& v) {
  return v.x.numel() * static_cast<int64_t>(v.x.element_size()) <= kRereadFromCacheMaxBytes;
}

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// n values left uninitialised, for scratch that every reader finds written. A zero-filled
// std::vector costs a serial memset before the parallel region: the per-group states of a
// channels-last pass are ~16 bytes per channel and group, ~10% of a 7x7 float16 layer's bytes.
template <typename T>
std::unique_ptr<T[]> uninitialized(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

// Scratch of n doubles for the per-group partials of a channels-last reduction (two arrays of
// up to kMaxGroups * C), left uninitialised as above. Fresh blocks that large come from mmap and
// go back to the system when freed, so every call's first writes to them took page faults (in
// one profile of the statistics of 32x2048x7x7, 2 threads, ~18% of the time sat on those
// writes). Each calling thread keeps one buffer of up to kKeptScratchBytes (for the life of the
// thread) and lends it to one borrower at a time; a larger or overlapping request gets fresh
// memory.
constexpr int64_t kKeptScratchBytes = int64_t(8) << 20;

class GroupScratch {
 public:
  explicit GroupScratch(int64_t n) {
    Kept& kept = kept_buffer();
    if (!kept.lent && n * static_cast<int64_t>(sizeof(double)) <= kKeptScratchBytes) {
      if (kept.size < n) {
        kept.data.reset();  // the old buffer first, so that both never coexist
        kept.data = uninitialized<double>(n);
        kept.size = n;
      }
      kept.lent = true;
      borrowed_ = true;
      data_ = kept.data.get();
    } else {
      owned_ = uninitialized<double>(n);
      data_ = owned_.get();
    }
  }
  ~GroupScratch() {
    if (borrowed_) kept_buffer().lent = false;
  }
  GroupScratch(const GroupScratch&) = delete;
  GroupScratch& operator=(const GroupScratch&) = delete;
  double* get() const { return data_; }

 private:
  struct Kept {
    std::unique_ptr<double[]> data;
    int64_t size = 0;
    bool lent = false;
  };
  static Kept& kept_buffer() {
    thread_local Kept kept;
    return kept;
  }
  std::unique_ptr<double[]> owned_;
  double* data_ = nullptr;
  bool borrowed_ = false;
};

// Per-channel vectors are derived from one another by host loops instead of chains of ATen ops:
// each ATen op on a (C,) tensor costs a microsecond or two of dispatch, more than its arithmetic,
// and a layer's call has a dozen of them.

// t * scale for a (C,) float64 tensor, rounded once to `dtype`.
at::Tensor scaled_to(const at::Tensor& t, double scale, at::ScalarType dtype) {
  at::Tensor out = at::empty(t.sizes(), t.options().dtype(dtype));
  const double* p = t.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dtype, "bn_cuda_scaled_to_cpu", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < t.numel(); ++i) o[i] = static_cast<scalar_t>(p[i] * scale);
  });
  return out;
}

// 1 / sqrt(var + eps) for a (C,) float32 or float64 tensor, in double, rounded once to `dtype`.
at::Tensor invstd_from_var(const at::Tensor& var, double eps, at::ScalarType dtype) {
  at::Tensor out = at::empty(var.sizes(), var.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(var.scalar_type(), "bn_cuda_invstd_cpu", [&] {
    using var_t = scalar_t;
    const var_t* p = var.const_data_ptr<var_t>();
    AT_DISPATCH_FLOATING_TYPES(dtype, "bn_cuda_invstd_cpu", [&] {
      scalar_t* o = out.mutable_data_ptr<scalar_t>();
      for (int64_t i = 0; i < var.numel(); ++i) {
        o[i] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(p[i]) + eps));
      }
    });
  });
  return out;
}

// a[c] * b[c] for the C channels, in acc_t (the per-channel scale invstd * weight).
template <typename acc_t>
std::vector<acc_t> channel_products(const at::Tensor& a, const at::Tensor& b) {
  const acc_t* a_p = a.const_data_ptr<acc_t>();
  const acc_t* b_p = b.const_data_ptr<acc_t>();
  std::vector<acc_t> out(a.numel());
  for (size_t c = 0; c < out.size(); ++c) out[c] = a_p[c] * b_p[c];
  return out;
}

// Channels per task of a channels-first pass over whole channels: enough for about
// kElementwiseGrain values, so that a small tensor runs on the calling thread instead of paying
// for waking the others (a few microseconds, more than a tiny layer's arithmetic).
int64_t channel_grain(const ChannelView& v) {
  return std::max<int64_t>(1, kElementwiseGrain / std::max<int64_t>(1, v.count()));
}

// The fixed split of the rows of a channels-last view into blocks and groups of whole blocks.
struct RowSplit {
  int64_t rows;
  int64_t block_rows;
  int64_t group_rows;
  int64_t groups;

  explicit RowSplit(const ChannelView& v) : rows(v.count()) {
    block_rows = std::clamp(kBlockElements / v.C, kMinBlockRows, kMaxBlockRows);
    const int64_t blocks = ceil_div(rows, block_rows);
    int64_t max_groups = kMaxGroups;
    if (blocks > 1 && blocks < kMaxGroups) {
      const int64_t balanced_rows = ceil_div(rows, ceil_div(blocks, kBalancedBlocks) * kBalancedBlocks);
      if (balanced_rows >= kMinBlockRows / 2) {
        block_rows = balanced_rows;
        max_groups = kBalancedBlocks;
      }
    }
    group_rows = ceil_div(ceil_div(rows, block_rows), max_groups) * block_rows;
    groups = ceil_div(rows, group_rows);
  }
  int64_t begin(int64_t g) const { return g * group_rows; }
  int64_t end(int64_t g) const { return std::min(rows, (g + 1) * group_rows); }
};

// Runs f(g) for every group, in parallel. `backward`: each thread walks its groups last to first
// (the thread ranges are the same as in the forward walk that read the data just before).
template <typename F>
void for_each_group(const RowSplit& split, bool backward, const F& f) {
  at::parallel_for(0, split.groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t i = g0; i < g1; ++i) f(backward ? g0 + g1 - 1 - i : i);
  });
}

// Calls f(offset, segs, len) for the chunks of channel c of a channels-first view, in order: a
// chunk is segs runs of len values, at offset + j * C * L for j < segs (several short segments,
// or a piece of a long one).
template <typename F>
void for_each_chunk(const ChannelView& v, int64_t c, const F& f) {
  if (v.L >= kChunk) {
    for (int64_t n = 0; n < v.N; ++n) {
      for (int64_t i = 0; i < v.L; i += kChunk) f((n * v.C + c) * v.L + i, 1, std::min(kChunk, v.L - i));
    }
  } else {
    const int64_t group = kChunk / v.L;
    for (int64_t n = 0; n < v.N; n += group) f((n * v.C + c) * v.L, std::min(group, v.N - n), v.L);
  }
}

// The prefetch offset (sum_segments) of a channels-first pass over channel c that reads channel
// c + 1 next: its planes follow c's at +L. Only for planes shorter than a chunk (longer ones are
// streams the hardware prefetches) and not past the last channel.
int64_t next_channel_prefetch(const ChannelView& v, int64_t c) {
  return v.L < kChunk && c + 1 < v.C ? v.L : 0;
}

// Operations of the loops in vec_loops.h; Coef is Scalar (one channel) or PerLane (a row).

// x - pivot
template <typename Coef>
auto shifted_op(Coef pivot) {
  return [=](int64_t i, auto x, auto, auto& acc) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    acc[0] += x - pivot.template at<T>(i);
  };
}

// (d, d^2) with d = x - pivot
template <typename Coef>
auto moments_op(Coef pivot) {
  return [=](int64_t i, auto x, auto, auto& acc) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    const T d = x - pivot.template at<T>(i);
    acc[0] += d;
    acc[1] += d * d;
  };
}

// (e, e^2) with e = (x - pivot) - m: subtracting pivot first keeps e exact for large means.
template <typename Coef>
auto deviation_op(Coef pivot, Coef m) {
  return [=](int64_t i, auto x, auto, auto& acc) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    const T e = (x - pivot.template at<T>(i)) - m.template at<T>(i);
    acc[0] += e;
    acc[1] += e * e;
  };
}

// (dy, dy * (x - mean))
template <typename Coef>
auto grad_sums_op(Coef mean) {
  return [=](int64_t i, auto x, auto g, auto& acc) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    acc[0] += g;
    acc[1] += g * (x - mean.template at<T>(i));
  };
}

// (x - mean) * scale + shift
template <typename Coef>
auto affine_op(Coef mean, Coef scale, Coef shift) {
  return [=](int64_t i, auto x, auto) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    return (x - mean.template at<T>(i)) * scale.template at<T>(i) + shift.template at<T>(i);
  };
}

// dx = (dy - a - (x - mean) * k) * s, or dx = dy * s when !kUsesX (eval statistics).
template <bool kUsesX, typename Coef>
auto grad_input_op(Coef mean, Coef a, Coef k, Coef s) {
  return [=](int64_t i, auto x, auto g) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    if constexpr (kUsesX) {
      return (g - a.template at<T>(i) - (x - mean.template at<T>(i)) * k.template at<T>(i)) * s.template at<T>(i);
    } else {
      return g * s.template at<T>(i);
    }
  };
}

// The (mean, m2) of `count` values from the float sums of a chunk's two passes: m is the mean of
// x - pivot from the first pass, se and see the sums of e = x - pivot - m and e^2 from the second;
// inv_count = 1 / count.
BN_CUDA_CPU_INLINE std::pair<double, double> chunk_moments(double pivot, double m, double se, double see,
                                                           double inv_count) {
  const double m2 = see - se * se * inv_count;
  return {pivot + m + se * inv_count, m2 < 0 ? 0 : m2};  // m2 < 0: rounding; a NaN stays NaN
}

Welford chunk_state(double pivot, double m, double se, double see, int64_t count) {
  const auto [mean, m2] = chunk_moments(pivot, m, se, see, 1.0 / static_cast<double>(count));
  return Welford{mean, m2, count};
}

// A channel's first value as the pivot of its sums, or 0 where it is Inf or NaN: an infinite
// pivot would turn every x - pivot into Inf or NaN, and the mean of a channel holding one Inf
// into NaN where it is that Inf (PyTorch's, too).
template <typename scalar_t>
opmath_t<scalar_t> first_value_pivot(scalar_t first) {
  const auto p = static_cast<opmath_t<scalar_t>>(first);
  return std::isfinite(p) ? p : opmath_t<scalar_t>(0);
}

// The mean of channel c as a plain sum in double, for a channel whose statistics came out NaN:
// where its values hold Infs of one sign and no NaN, its mean is that Inf (as PyTorch's CPU
// kernel gives it), which the pivoted sums turn into NaN (Inf - Inf). One strided pass, only for
// such channels.
template <typename scalar_t>
double plain_channel_mean(const scalar_t* x, const ChannelView& v, int64_t c) {
  double sum = 0;
  if (v.channels_last) {
    for (int64_t r = 0; r < v.count(); ++r) sum += static_cast<double>(x[r * v.C + c]);
  } else {
    for (int64_t n = 0; n < v.N; ++n) {
      const scalar_t* plane = x + (n * v.C + c) * v.L;
      for (int64_t l = 0; l < v.L; ++l) sum += static_cast<double>(plane[l]);
    }
  }
  return sum / static_cast<double>(v.count());
}

// A channel's state with its mean fixed up by plain_channel_mean where it is NaN.
template <typename scalar_t>
Welford with_plain_mean_if_nan(Welford s, const scalar_t* x, const ChannelView& v, int64_t c) {
  if (std::isnan(s.mean)) s.mean = plain_channel_mean(x, v, c);
  return s;
}

// Channel c of a channels-first view: Chan merge of its chunk states, in chunk order.
template <typename scalar_t>
Welford channel_stats_ncl(const scalar_t* x, const ChannelView& v, int64_t c) {
  using acc_t = opmath_t<scalar_t>;
  const Scalar<acc_t> pivot{first_value_pivot(x[c * v.L])};
  const int64_t stride = v.C * v.L;
  Welford s;
  const int64_t prefetch = next_channel_prefetch(v, c);
  for_each_chunk(v, c, [&](int64_t offset, int64_t segs, int64_t len) {
    const acc_t shifted = sum_segments<1, false>(x + offset, x, stride, segs, len, shifted_op(pivot), prefetch)[0];
    const int64_t count = segs * len;
    const Scalar<acc_t> m{shifted / static_cast<acc_t>(count)};
    const auto [se, see] = sum_segments<2, false>(x + offset, x, stride, segs, len, deviation_op(pivot, m));
    s = welford_merge(s, chunk_state(pivot.value, m.value, se, see, count));
  });
  return s;
}

// A pivot p for one-pass sums of d = x - pivot, rounded to the input's dtype (fallback where that
// is not finite). For half and bfloat16 input, d is then exact in float: a pivot with low bits
// of its own would put the same rounding into every d, the float sums of d would round the same
// way row after row, and the mean would drift by ~1e-6 std (half input, 256-row blocks) where a
// pivot on the input's grid leaves ~1e-8. float and double keep p.
template <typename scalar_t, typename acc_t>
acc_t pivot_on_input_grid(acc_t p, acc_t fallback) {
  const acc_t on_grid = static_cast<acc_t>(static_cast<scalar_t>(p));
  return std::isfinite(on_grid) ? on_grid : fallback;
}

// Statistics of channels [c0, c1) of a channels-first view with short planes (kMemoryOrderPlane),
// read once in memory order (sum_planes): the sums of d = x - pivot and d^2, the pivot the mean
// of the channel's first plane (on the input's grid: pivot_on_input_grid). As in
// channel_stats_nlc, (mean, m2) come from those sums where the channel's mean lies within ~3.9
// std of its pivot (kOnePassShift); a channel that does not (its first plane far from the rest,
// non-finite values) is read again by channel_stats_ncl's two passes, which are as accurate as a
// two-pass algorithm.
template <typename scalar_t>
std::vector<Welford> plane_stats(const scalar_t* x, const ChannelView& v, int64_t c0, int64_t c1) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t channels = c1 - c0;
  const int64_t L = v.L;
  std::vector<double> totals(2 * channels);
  sum_planes<1, false>(
      x, x, /*N=*/1, v.C, L, c0, c1,
      [x, L](int64_t c) __attribute__((always_inline)) {
        return shifted_op(Scalar<acc_t>{first_value_pivot(x[c * L])});
      },
      totals.data());
  std::vector<acc_t> pivot(channels);
  for (int64_t j = 0; j < channels; ++j) {
    const acc_t first = first_value_pivot(x[(c0 + j) * L]);
    pivot[j] = pivot_on_input_grid<scalar_t>(first + static_cast<acc_t>(totals[j] / static_cast<double>(L)), first);
  }
  const acc_t* const pivot_p = pivot.data();
  sum_planes<2, false>(
      x, x, v.N, v.C, L, c0, c1,
      [pivot_p, c0](int64_t c) __attribute__((always_inline)) { return moments_op(Scalar<acc_t>{pivot_p[c - c0]}); },
      totals.data());
  const int64_t count = v.count();
  const double inv_count = 1.0 / static_cast<double>(count);
  std::vector<Welford> out(channels);
  for (int64_t j = 0; j < channels; ++j) {
    const double sd = totals[j], sdd = totals[channels + j];
    if (sd * sd * inv_count <= kOnePassShift * sdd) {  // false for NaN
      const auto [mean, m2] = chunk_moments(pivot[j], 0, sd, sdd, inv_count);
      out[j] = Welford{mean, m2, count};
    } else {
      out[j] = channel_stats_ncl(x, v, c0 + j);
    }
  }
  return out;
}

// The statistics of channels [c0, c1) of a channels-first view, by plane_stats or channel by
// channel (channel_stats_ncl), as the plane length asks.
template <typename scalar_t>
std::vector<Welford> channels_stats_ncl(const scalar_t* x, const ChannelView& v, int64_t c0, int64_t c1) {
  if (v.L < kMemoryOrderPlane) return plane_stats(x, v, c0, c1);
  std::vector<Welford> out(c1 - c0);
  for (int64_t c = c0; c < c1; ++c) out[c - c0] = channel_stats_ncl(x, v, c);
  return out;
}

// Chan's merge (welford_merge) of states b into states a for n channels whose states share their
// counts, as those of one channels-last row block do: the count ratios are computed once per
// merge, not per channel (a per-channel welford_merge costs more than the block's two passes
// when C is large). state_b(c) gives lane c's (mean, m2). Returns the merged count. Compiled for
// the selected ISA (the loop vectorises over lanes).
template <typename StateB>
int64_t merge_lanes(int64_t n, int64_t count_a, double* mean_a, double* m2_a, int64_t count_b,
                    const StateB& state_b) {
  const double b_share = static_cast<double>(count_b) / static_cast<double>(count_a + count_b);
  const double delta_weight = static_cast<double>(count_a) * b_share;
  run_selected([&](auto) __attribute__((always_inline)) {
    for (int64_t c = 0; c < n; ++c) {
      const auto [mean_b, m2_b] = state_b(c);
      if (count_a == 0) {
        mean_a[c] = mean_b;
        m2_a[c] = m2_b;
      } else {
        const double delta = mean_b - mean_a[c];
        mean_a[c] += delta * b_share;
        m2_a[c] += m2_b + delta * delta * delta_weight;
      }
    }
  });
  return count_a + count_b;
}

// total[c] = part[c] (first) or total[c] += part[c], in double, for n channels.
template <typename acc_t>
void add_to_double(int64_t n, bool first, const acc_t* part, double* total) {
  run_selected([&](auto) __attribute__((always_inline)) {
    if (first) {
      for (int64_t c = 0; c < n; ++c) total[c] = static_cast<double>(part[c]);
    } else {
      for (int64_t c = 0; c < n; ++c) total[c] += static_cast<double>(part[c]);
    }
  });
}

// Channels-last statistics, one state per channel. Each block of rows is reduced into per-channel
// float sums, gathered into its group's states; groups are merged in group order.
// A block is read once from memory, for the sums of d = x - pivot and d^2, with the pivot the
// mean of the first kPivotRows rows (on the input's grid: pivot_on_input_grid). Where every
// channel's block mean lies near the pivot (|mean - pivot| <= ~3.9 std of the block: the squared
// shift is at most kOnePassShift of the mean of d^2), the block's sums are added, in double, to
// the group's sums of its one-pass blocks, and (mean, m2) come from those at the group's end: the
// cancellation in m2 = sum d^2 - (sum d)^2 / n then costs at most a factor 1 / (1 -
// kOnePassShift) = 16 in relative error (each block's sum of d^2 is at most 16 times its own m2,
// so the group's is at most 16 times the group's m2). Else (a block far from the first rows,
// constant or non-finite channels) the block, now in L2, is read again for the deviations from
// its own mean (the sums of e = d - m and e^2), as a two-pass algorithm does, and its state, as
// accurate as that, is merged into the group's by Chan's formula.
template <typename scalar_t>
std::vector<Welford> channel_stats_nlc(const scalar_t* x, const ChannelView& v) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = v.C;
  const RowSplit split(v);
  // The pivot: row 0 (first_value_pivot) plus the mean shift of the first kPivotRows rows from
  // it, where that is finite (a pivot within a few std of each block's mean is all the one-pass
  // sums need).
  std::vector<acc_t> pivot_values(C);
  for (int64_t c = 0; c < C; ++c) pivot_values[c] = first_value_pivot(x[c]);
  {
    const int64_t rows = std::min(split.rows, kPivotRows);
    std::vector<acc_t> shift(C);
    acc_t* sums[] = {shift.data()};
    accumulate_rows<1, false>(x, x, C, rows, C, shifted_op(PerLane<acc_t>{pivot_values.data()}), sums);
    for (int64_t c = 0; c < C; ++c) {
      pivot_values[c] = pivot_on_input_grid<scalar_t>(pivot_values[c] + shift[c] / static_cast<acc_t>(rows),
                                                      pivot_values[c]);
    }
  }
  const PerLane<acc_t> pivot{pivot_values.data()};
  // Written by each group's first merge_lanes (count 0) before anything reads them.
  const GroupScratch group_states(2 * split.groups * C);
  double* const group_mean = group_states.get();
  double* const group_m2 = group_mean + split.groups * C;
  for_each_group(split, /*backward=*/false, [&](int64_t g) {
    // sd, sdd: zeroed per block below; se, see: written whole by sum_rows.
    const auto scratch = uninitialized<acc_t>(4 * C);
    acc_t* const sd = scratch.get();
    acc_t* const sdd = sd + C;
    acc_t* const se = sdd + C;
    acc_t* const see = se + C;
    acc_t* moment_sums[] = {sd, sdd};
    acc_t* deviation_sums[] = {se, see};
    // The one-pass blocks' sums, added up in double: they share the pivot, so they fold into one
    // state at the group's end (two adds per channel and block instead of a Chan merge each).
    // Written by the first fold before anything reads them.
    const auto one_pass_sums = uninitialized<double>(2 * C);
    double* const sum_d = one_pass_sums.get();
    double* const sum_dd = sum_d + C;
    int64_t one_pass_rows = 0;
    int64_t count = 0;
    for (int64_t r0 = split.begin(g); r0 < split.end(g); r0 += split.block_rows) {
      const int64_t r1 = std::min(split.end(g), r0 + split.block_rows);
      const double inv_count = 1.0 / static_cast<double>(r1 - r0);
      // The pass from memory goes along whole rows (the prefetcher's streams); the second one,
      // where needed, down column tiles (the block is in L2; the sums stay in registers).
      std::fill(sd, sd + C, acc_t(0));
      std::fill(sdd, sdd + C, acc_t(0));
      const PrefetchAhead ahead{(split.rows - r0) * C};
      accumulate_rows<2, false>(x + r0 * C, x, C, r1 - r0, C, moments_op(pivot), moment_sums, ahead);
      bool one_pass = true;
      for (int64_t c = 0; c < C && one_pass; ++c) {
        const double d = sd[c];
        one_pass = d * d * inv_count <= kOnePassShift * static_cast<double>(sdd[c]);  // false for NaN
      }
      if (one_pass) {
        add_to_double(C, one_pass_rows == 0, sd, sum_d);
        add_to_double(C, one_pass_rows == 0, sdd, sum_dd);
        one_pass_rows += r1 - r0;
        continue;
      }
      const acc_t inv_rows = acc_t(1) / static_cast<acc_t>(r1 - r0);
      for (int64_t c = 0; c < C; ++c) sd[c] *= inv_rows;  // now m, the block's mean of d
      sum_rows<2, false>(x + r0 * C, x, C, r1 - r0, C, deviation_op(pivot, PerLane<acc_t>{sd}), deviation_sums);
      count = merge_lanes(C, count, group_mean + g * C, group_m2 + g * C, r1 - r0,
                          [&](int64_t c) __attribute__((always_inline)) {
                            return chunk_moments(pivot_values[c], sd[c], se[c], see[c], inv_count);
                          });
    }
    if (one_pass_rows > 0) {
      const double inv_rows = 1.0 / static_cast<double>(one_pass_rows);
      merge_lanes(C, count, group_mean + g * C, group_m2 + g * C, one_pass_rows,
                  [&](int64_t c) __attribute__((always_inline)) {
                    return chunk_moments(pivot_values[c], 0, sum_d[c], sum_dd[c], inv_rows);
                  });
    }
  });
  // Groups merged in group order, each thread over its own channels.
  std::vector<Welford> out(C);
  at::parallel_for(0, C, kMergeGrain, [&](int64_t c0, int64_t c1) {
    std::vector<double> mean(c1 - c0), m2(c1 - c0);
    int64_t count = 0;
    for (int64_t g = 0; g < split.groups; ++g) {
      const double* gm = group_mean + g * C + c0;
      const double* gm2 = group_m2 + g * C + c0;
      count = merge_lanes(c1 - c0, count, mean.data(), m2.data(), split.end(g) - split.begin(g),
                          [&](int64_t c) __attribute__((always_inline)) { return std::pair{gm[c], gm2[c]}; });
    }
    for (int64_t c = c0; c < c1; ++c) out[c] = Welford{mean[c - c0], m2[c - c0], count};
  });
  return out;
}

// x * scale + offset
template <typename Coef>
auto scale_offset_op(Coef scale, Coef offset) {
  return [=](int64_t i, auto x, auto) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    return x * scale.template at<T>(i) + offset.template at<T>(i);
  };
}

// y = x * scale + offset, offset = shift - mean * scale rounded once from double, may stand for
// (x - mean) * scale + shift where every |mean| is at most kFoldMeanStd standard deviations
// (|mean| * invstd): its extra rounding, of x * scale and of offset, is then within
// ~2 * kFoldMeanStd units in the last place of |scale| * std, the output's scale. That is far
// below a float16 or bfloat16 output's rounding (2^-19 of the output's scale against 2^-12 and
// 2^-9), so those fold whenever the bound holds; float32 and float64 fold only where it buys
// more than an instruction (affine_nlc's many channels).
constexpr double kFoldMeanStd = 16;

// Per-channel coefficient arrays of more than this many bytes together crowd the 32 KiB L1 beside
// a channels-last row of the inputs and the output: the channels-last passes then fold the mean
// into fewer arrays (affine_nlc, folded_grad_input_nlc) where every channel may.
constexpr int64_t kManyChannelCoefBytes = 16384;

// Whether one channel may fold: false for a NaN mean or invstd too.
template <typename acc_t>
bool foldable(acc_t mean, acc_t invstd) {
  return std::abs(static_cast<double>(mean) * invstd) <= kFoldMeanStd;
}

template <typename acc_t>
acc_t folded_offset(acc_t mean, acc_t scale, acc_t shift) {
  return static_cast<acc_t>(static_cast<double>(shift) - static_cast<double>(mean) * scale);
}

// The offsets of the folded form for C channels, or an empty vector where some channel may not
// fold.
template <typename acc_t>
std::vector<acc_t> folded_offsets(const acc_t* mean, const acc_t* invstd, const acc_t* scale, const acc_t* shift,
                                  int64_t C) {
  std::vector<acc_t> offset(C);
  for (int64_t c = 0; c < C; ++c) {
    if (!foldable(mean[c], invstd[c])) return {};
    offset[c] = folded_offset(mean[c], scale[c], shift[c]);
  }
  return offset;
}

// out = op over every row of a channels-last view (per group of RowSplit), reading a (and b where
// kHasB) at out's offsets; streamed where streams_output(v, output). `backward` as in
// for_each_group: such a pass re-reads what the pass before it read, through map_cached_rows
// where that sits in the caches (rereads_from_cache), else map_segments.
template <bool kHasB, typename scalar_t, typename Op>
void map_rows_nlc(const scalar_t* a, const scalar_t* b, scalar_t* out, const ChannelView& v, const Op& op,
                  Output output, bool backward) {
  const int64_t C = v.C;
  const RowSplit split(v);
  const bool stream = streams_output(v, output);
  const bool cached = backward && rereads_from_cache(v);
  for_each_group(split, backward, [&](int64_t g) {
    const int64_t o = split.begin(g) * C;
    const int64_t rows = split.end(g) - split.begin(g);
    if (cached) {
      map_cached_rows<kHasB>(a + o, kHasB ? b + o : b, out + o, rows, C, op, stream);
    } else {
      map_segments<kHasB>(a + o, kHasB ? b + o : b, out + o, C, rows, C, op, stream);
    }
  });
}

// Channels-last y = (x - mean) * scale + shift over all rows; `backward` as in for_each_group.
// Folded (see kFoldMeanStd) for float16/bfloat16, and with many channels, where three
// per-channel arrays crowd L1 beside the rows (C = 2048 float: 24 KiB of 32): reading two
// arrays instead is ~1.5x faster at C = 2048.
template <typename scalar_t, typename acc_t>
void affine_nlc(const scalar_t* x, scalar_t* y, const ChannelView& v, const acc_t* mean, const acc_t* invstd,
                const acc_t* scale, const acc_t* shift, bool backward) {
  const int64_t C = v.C;
  const bool fold =
      !std::is_same_v<scalar_t, acc_t> || 3 * C * static_cast<int64_t>(sizeof(acc_t)) > kManyChannelCoefBytes;
  const std::vector<acc_t> offset = fold ? folded_offsets(mean, invstd, scale, shift, C) : std::vector<acc_t>{};
  if (!offset.empty()) {
    map_rows_nlc<false>(x, x, y, v, scale_offset_op(PerLane<acc_t>{scale}, PerLane<acc_t>{offset.data()}),
                        Output::kNormalized, backward);
  } else {
    map_rows_nlc<false>(x, x, y, v, affine_op(PerLane<acc_t>{mean}, PerLane<acc_t>{scale}, PerLane<acc_t>{shift}),
                        Output::kNormalized, backward);
  }
}

// Channels-first y = (x - mean) * scale + shift over the (n, c) planes s in [s0, s1), or
// y = x * scale + offset where offset is not null (folded, see kFoldMeanStd); coefficients
// indexed by channel. `stream`: streams_output(v, Output::kNormalized), decided once by the caller.
template <typename scalar_t, typename acc_t>
void affine_planes(const scalar_t* x, scalar_t* y, const ChannelView& v, int64_t s0, int64_t s1, const acc_t* mean,
                   const acc_t* scale, const acc_t* shift, const acc_t* offset, bool stream) {
  if (offset != nullptr) {
    map_planes<false>(
        x, x, y, v.L, v.C, s0, s1,
        [scale, offset](int64_t c) __attribute__((always_inline)) {
          return scale_offset_op(Scalar<acc_t>{scale[c]}, Scalar<acc_t>{offset[c]});
        },
        stream);
  } else {
    map_planes<false>(
        x, x, y, v.L, v.C, s0, s1,
        [mean, scale, shift](int64_t c) __attribute__((always_inline)) {
          return affine_op(Scalar<acc_t>{mean[c]}, Scalar<acc_t>{scale[c]}, Scalar<acc_t>{shift[c]});
        },
        stream);
  }
}

// Channels-first y = (x - mean) * scale + shift, over ranges of (n, c) planes; folded (see
// kFoldMeanStd) for float16/bfloat16.
template <typename scalar_t, typename acc_t>
void affine_ncl(const scalar_t* x, scalar_t* y, const ChannelView& v, const acc_t* mean, const acc_t* invstd,
                const acc_t* scale, const acc_t* shift) {
  const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / v.L);
  const std::vector<acc_t> offset = std::is_same_v<scalar_t, acc_t>
                                        ? std::vector<acc_t>{}
                                        : folded_offsets(mean, invstd, scale, shift, v.C);
  const acc_t* offset_p = offset.empty() ? nullptr : offset.data();
  const bool stream = streams_output(v, Output::kNormalized);
  at::parallel_for(0, v.N * v.C, grain, [&](int64_t s0, int64_t s1) {
    affine_planes(x, y, v, s0, s1, mean, scale, shift, offset_p, stream);
  });
}

// Per-channel statistics as (mean, var) float64 tensors; biased var.
std::tuple<at::Tensor, at::Tensor> compute_stats(const ChannelView& v) {
  auto mean = at::empty({v.C}, v.x.options().dtype(at::kDouble));
  auto var = at::empty({v.C}, v.x.options().dtype(at::kDouble));
  if (v.count() == 0) {
    mean.zero_();
    var.zero_();
  } else {
    double* mean_p = mean.mutable_data_ptr<double>();
    double* var_p = var.mutable_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_stats_cpu", [&] {
      const scalar_t* x = v.x.const_data_ptr<scalar_t>();
      if (v.channels_last) {
        const auto states = channel_stats_nlc(x, v);
        for (int64_t c = 0; c < v.C; ++c) {
          mean_p[c] = with_plain_mean_if_nan(states[c], x, v, c).mean;
          var_p[c] = welford_variance(states[c]);
        }
      } else {
        at::parallel_for(0, v.C, channel_grain(v), [&](int64_t c0, int64_t c1) {
          const std::vector<Welford> states = channels_stats_ncl(x, v, c0, c1);
          for (int64_t c = c0; c < c1; ++c) {
            mean_p[c] = with_plain_mean_if_nan(states[c - c0], x, v, c).mean;
            var_p[c] = welford_variance(states[c - c0]);
          }
        });
      }
    });
  }
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input) {
  return compute_stats(channel_view(input, "stats"));
}

// y = (x - mean) * (invstd * weight) + bias, the per-channel vectors already in acc dtype.
// `backward`: the channels-last pass walks rows backwards (it follows a full read of x).
at::Tensor normalize_with(const ChannelView& v, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& weight, const at::Tensor& bias, bool backward = false) {
  at::Tensor y = empty_output(v);
  if (v.x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_normalize_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* x = v.x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const acc_t* mean_p = mean.const_data_ptr<acc_t>();
    const acc_t* invstd_p = invstd.const_data_ptr<acc_t>();
    const std::vector<acc_t> scale = channel_products<acc_t>(invstd, weight);
    const acc_t* scale_p = scale.data();
    const acc_t* bias_p = bias.const_data_ptr<acc_t>();
    if (v.channels_last) {
      affine_nlc(x, out, v, mean_p, invstd_p, scale_p, bias_p, backward);
    } else {
      affine_ncl(x, out, v, mean_p, invstd_p, scale_p, bias_p);
    }
  });
  return y;
}

at::Tensor normalize(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                     const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  const ChannelView v = channel_view(input, "normalize");
  return normalize_with(v, channel_vector(mean, "mean", v, "normalize"),
                        channel_vector(invstd, "invstd", v, "normalize"),
                        channel_vector(weight, "weight", v, 1.0, "normalize"),
                        channel_vector(bias, "bias", v, 0.0, "normalize"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_train(const at::Tensor& input,
                                                                         const c10::optional<at::Tensor>& weight,
                                                                         const c10::optional<at::Tensor>& bias,
                                                                         double eps) {
  const char* op = "forward_train";
  const ChannelView v = channel_view(input, op);
  check_eps(eps, /*training=*/true, op);
  const at::Tensor w = channel_vector(weight, "weight", v, 1.0, op);
  const at::Tensor b = channel_vector(bias, "bias", v, 0.0, op);
  const auto acc = acc_type(v.x.scalar_type());
  if (v.channels_last || v.count() == 0) {
    auto [mean64, var64] = compute_stats(v);
    const at::Tensor mean = scaled_to(mean64, 1.0, acc);
    const at::Tensor invstd = invstd_from_var(var64, eps, acc);
    return {normalize_with(v, mean, invstd, w, b, /*backward=*/true), mean, invstd, scaled_to(var64, 1.0, acc)};
  }
  // Channels-first, long planes: statistics and normalization of one channel back to back, while
  // it is hot; the normalization walks the segments backwards, starting on the most recently
  // read. Short planes: a task's channels at a time, in memory order (see kMemoryOrderPlane).
  at::Tensor y = empty_output(v);
  at::Tensor mean = at::empty({v.C}, v.x.options().dtype(acc));
  at::Tensor invstd = at::empty({v.C}, v.x.options().dtype(acc));
  at::Tensor var = at::empty({v.C}, v.x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_forward_train_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* x = v.x.const_data_ptr<scalar_t>();
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    const acc_t* w_p = w.const_data_ptr<acc_t>();
    const acc_t* b_p = b.const_data_ptr<acc_t>();
    acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
    acc_t* invstd_p = invstd.mutable_data_ptr<acc_t>();
    acc_t* var_p = var.mutable_data_ptr<acc_t>();
    // y = (x - centers) * scales + shifts per channel, filled by each task for its channels.
    // Float16/bfloat16 fold each channel that allows it (see kFoldMeanStd): center 0 and the
    // folded offset as shift, which rounds exactly as x * scale + offset.
    std::vector<acc_t> centers(v.C), scales(v.C), shifts(v.C);
    const bool stream = streams_output(v, Output::kNormalized);
    at::parallel_for(0, v.C, channel_grain(v), [&](int64_t c0, int64_t c1) {
      // Sets channel c's mean, var, invstd and coefficients from its state; returns whether it
      // folds.
      const auto set_channel = [&](int64_t c, const Welford& s) __attribute__((always_inline)) {
        const double channel_var = welford_variance(s);
        mean_p[c] = static_cast<acc_t>(with_plain_mean_if_nan(s, x, v, c).mean);
        var_p[c] = static_cast<acc_t>(channel_var);
        invstd_p[c] = static_cast<acc_t>(1.0 / std::sqrt(channel_var + eps));
        scales[c] = invstd_p[c] * w_p[c];
        const bool fold = !std::is_same_v<scalar_t, acc_t> && foldable(mean_p[c], invstd_p[c]);
        centers[c] = fold ? acc_t(0) : mean_p[c];
        shifts[c] = fold ? folded_offset(mean_p[c], scales[c], b_p[c]) : b_p[c];
        return fold;
      };
      if (v.L < kMemoryOrderPlane) {
        // Statistics in memory order, then the normalization image by image from the last, whose
        // planes the statistics read last. Each channel folds on its own, so the result does not
        // depend on which channels share a task (that is, on the thread count); where all of a
        // task's channels fold, the loop drops the subtraction.
        const std::vector<Welford> states = plane_stats(x, v, c0, c1);
        bool all_fold = true;
        for (int64_t c = c0; c < c1; ++c) all_fold = set_channel(c, states[c - c0]) && all_fold;
        for (int64_t n = v.N - 1; n >= 0; --n) {
          affine_planes(x, out, v, n * v.C + c0, n * v.C + c1, centers.data(), scales.data(), shifts.data(),
                        all_fold ? shifts.data() : nullptr, stream);
        }
        return;
      }
      for (int64_t c = c0; c < c1; ++c) {
        const bool fold = set_channel(c, channel_stats_ncl(x, v, c));
        const int64_t last = ((v.N - 1) * v.C + c) * v.L;  // planes from last to first
        const Scalar<acc_t> scale{scales[c]}, shift{shifts[c]};
        if (fold) {
          map_segments<false>(x + last, x, out + last, -v.C * v.L, v.N, v.L, scale_offset_op(scale, shift), stream);
        } else {
          map_segments<false>(x + last, x, out + last, -v.C * v.L, v.N, v.L,
                              affine_op(Scalar<acc_t>{centers[c]}, scale, shift), stream);
        }
      }
    });
  });
  return {y, mean, invstd, var};
}

at::Tensor forward_eval(const at::Tensor& input, const at::Tensor& running_mean, const at::Tensor& running_var,
                        const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps) {
  const char* op = "forward_eval";
  const ChannelView v = channel_view(input, op);
  check_eps(eps, /*training=*/false, op);
  const at::Tensor mean = channel_vector(running_mean, "running_mean", v, op);
  const at::Tensor var = channel_vector(running_var, "running_var", v, op);
  const at::Tensor invstd = invstd_from_var(var, eps, var.scalar_type());
  return normalize_with(v, mean, invstd, channel_vector(weight, "weight", v, 1.0, op),
                        channel_vector(bias, "bias", v, 0.0, op));
}

// (sum dy, sum dy * (x - mean)) for channel c of a channels-first view: float per run of at
// most kChunk values, double across runs (summing a chunk's runs in float would lose accuracy
// against PyTorch's weight and bias gradients).
template <typename scalar_t>
std::pair<double, double> channel_grad_sums_ncl(const scalar_t* x, const scalar_t* dy, const ChannelView& v,
                                                int64_t c, opmath_t<scalar_t> mean) {
  using acc_t = opmath_t<scalar_t>;
  const auto op = grad_sums_op(Scalar<acc_t>{mean});
  const int64_t stride = v.C * v.L;
  double sum_dy = 0, sum_dy_xmu = 0;
  const int64_t prefetch = next_channel_prefetch(v, c);
  for_each_chunk(v, c, [&](int64_t offset, int64_t segs, int64_t len) {
    const auto t =
        sum_segments<2, true, /*kDoubleAcrossRuns=*/true>(x + offset, dy + offset, stride, segs, len, op, prefetch);
    sum_dy += t[0];
    sum_dy_xmu += t[1];
  });
  return {sum_dy, sum_dy_xmu};
}

// (sum dy, sum dy * (x - mean)) of channels [c0, c1) of a channels-first view into sum_dy[c] and
// sum_dy_xmu[c]: in memory order (sum_planes) or a channel at a time.
template <typename scalar_t>
void channels_grad_sums_ncl(const scalar_t* x, const scalar_t* dy, const ChannelView& v, int64_t c0, int64_t c1,
                            const opmath_t<scalar_t>* mean, bool memory_order, double* sum_dy, double* sum_dy_xmu) {
  using acc_t = opmath_t<scalar_t>;
  if (!memory_order) {
    for (int64_t c = c0; c < c1; ++c) std::tie(sum_dy[c], sum_dy_xmu[c]) = channel_grad_sums_ncl(x, dy, v, c, mean[c]);
    return;
  }
  const int64_t channels = c1 - c0;
  std::vector<double> totals(2 * channels);
  sum_planes<2, true>(
      x, dy, v.N, v.C, v.L, c0, c1,
      [mean](int64_t c) __attribute__((always_inline)) { return grad_sums_op(Scalar<acc_t>{mean[c]}); },
      totals.data());
  std::copy(totals.begin(), totals.begin() + channels, sum_dy + c0);
  std::copy(totals.begin() + channels, totals.end(), sum_dy_xmu + c0);
}

// Channels-last (sum dy, sum dy * (x - mean)) per channel: float over at most kSumRows rows,
// double per group, groups added in group order.
template <typename scalar_t>
void grad_sums_nlc(const scalar_t* x, const scalar_t* dy, const ChannelView& v, const opmath_t<scalar_t>* mean,
                   double* sum_dy, double* sum_dy_xmu) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t C = v.C;
  const RowSplit split(v);
  const auto op = grad_sums_op(PerLane<acc_t>{mean});
  // Each group writes its own partials (its first block sets them), in the parallel region (see
  // uninitialized).
  const GroupScratch partials(2 * split.groups * C);
  double* const part_dy = partials.get();
  double* const part_dy_xmu = part_dy + split.groups * C;
  for_each_group(split, /*backward=*/false, [&](int64_t g) {
    const auto scratch = uninitialized<acc_t>(2 * C);
    acc_t* const block_dy = scratch.get();
    acc_t* const block_dy_xmu = block_dy + C;
    double* pdy = part_dy + g * C;
    double* pdx = part_dy_xmu + g * C;
    for (int64_t r0 = split.begin(g); r0 < split.end(g); r0 += kSumRows) {
      const int64_t r1 = std::min(split.end(g), r0 + kSumRows);
      std::fill(block_dy, block_dy + C, acc_t(0));
      std::fill(block_dy_xmu, block_dy_xmu + C, acc_t(0));
      acc_t* sums[] = {block_dy, block_dy_xmu};
      const PrefetchAhead ahead{(split.rows - r0) * C};
      accumulate_rows<2, true>(x + r0 * C, dy + r0 * C, C, r1 - r0, C, op, sums, ahead);
      add_to_double(C, r0 == split.begin(g), block_dy, pdy);
      add_to_double(C, r0 == split.begin(g), block_dy_xmu, pdx);
    }
  });
  std::fill(sum_dy, sum_dy + C, 0.0);
  std::fill(sum_dy_xmu, sum_dy_xmu + C, 0.0);
  for (int64_t g = 0; g < split.groups; ++g) {
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += part_dy[g * C + c];
      sum_dy_xmu[c] += part_dy_xmu[g * C + c];
    }
  }
}

// Per-channel (sum dy, sum dy * (x - mean)) as double tensors; mean in acc dtype.
std::tuple<at::Tensor, at::Tensor> grad_sums(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean) {
  at::Tensor sum_dy = at::empty({v.C}, v.x.options().dtype(at::kDouble));
  at::Tensor sum_dy_xmu = at::empty({v.C}, v.x.options().dtype(at::kDouble));
  if (v.count() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  double* sdy = sum_dy.mutable_data_ptr<double>();
  double* sdx = sum_dy_xmu.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_grad_sums_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* x = v.x.const_data_ptr<scalar_t>();
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    const acc_t* mean_p = mean.const_data_ptr<acc_t>();
    if (v.channels_last) {
      grad_sums_nlc(x, g, v, mean_p, sdy, sdx);
    } else {
      at::parallel_for(0, v.C, channel_grain(v), [&](int64_t c0, int64_t c1) {
        channels_grad_sums_ncl(x, g, v, c0, c1, mean_p, v.L < kMemoryOrderPlane, sdy, sdx);
      });
    }
  });
  return {sum_dy, sum_dy_xmu};
}

std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_output, const at::Tensor& input,
                                                   const at::Tensor& mean) {
  const char* op = "backward_reduce";
  const ChannelView v = channel_view(input, op);
  const at::Tensor dy = grad_like_view(grad_output, v, op);
  auto [sum_dy, sum_dy_xmu] = grad_sums(v, dy, channel_vector(mean, "mean", v, op));
  const auto acc = acc_type(v.x.scalar_type());
  return {scaled_to(sum_dy, 1.0, acc), scaled_to(sum_dy_xmu, 1.0, acc)};
}

// Channels-first dx (see grad_input_op) over the (n, c) planes s in [s0, s1); coefficients
// indexed by channel. `stream`: streams_output(v, Output::kGradInput), decided once by the caller.
template <bool kUsesX, typename scalar_t, typename acc_t>
void grad_input_planes(const scalar_t* x, const scalar_t* g, scalar_t* out, const ChannelView& v, int64_t s0,
                       int64_t s1, const acc_t* mean, const acc_t* a, const acc_t* k, const acc_t* s, bool stream) {
  // Captures by value, as map_planes wants (it keeps a copy in registers).
  const auto make_op = [mean, a, k, s](int64_t c) __attribute__((always_inline)) {
    return grad_input_op<kUsesX>(Scalar<acc_t>{mean[c]}, Scalar<acc_t>{a[c]}, Scalar<acc_t>{k[c]},
                                 Scalar<acc_t>{s[c]});
  };
  if constexpr (kUsesX) {
    map_planes<true>(x, g, out, v.L, v.C, s0, s1, make_op, stream);
  } else {
    // Eval statistics read only dy: it goes in the first slot.
    map_planes<false>(
        g, g, out, v.L, v.C, s0, s1,
        [make_op](int64_t c) __attribute__((always_inline)) {
          return [op = make_op(c)](int64_t i, auto gi, auto) { return op(i, gi, gi); };
        },
        stream);
  }
}

// dx = dy * s + (x * q + r): grad_input_op<true> with q = -k * s and r = (mean * k - a) * s, where
// every channel may fold (see kFoldMeanStd: x * q and r then cancel to at most ~2 * kFoldMeanStd
// units in the last place of the (x - mean) * k * s term).
template <typename Coef>
auto folded_grad_input_op(Coef s, Coef q, Coef r) {
  return [=](int64_t i, auto x, auto g) BN_CUDA_CPU_ALWAYS_INLINE {
    using T = decltype(x);
    return g * s.template at<T>(i) + (x * q.template at<T>(i) + r.template at<T>(i));
  };
}

// Channels-last training dx with many channels: three per-channel arrays instead of the four of
// grad_input_op, which beside a row of x, dy and dx crowd the 32 KiB L1 (C = 2048 float: 32 KiB
// of coefficients). Returns false (nothing written) where C is smaller or some channel may not
// fold. `backward` as in grad_input.
template <typename scalar_t, typename acc_t>
bool folded_grad_input_nlc(const ChannelView& v, const scalar_t* x, const scalar_t* g, scalar_t* out,
                           const acc_t* mean, const acc_t* invstd, const acc_t* a, const acc_t* k, const acc_t* s,
                           bool backward) {
  const int64_t C = v.C;
  if (4 * C * static_cast<int64_t>(sizeof(acc_t)) <= kManyChannelCoefBytes) return false;
  std::vector<acc_t> q(C), r(C);
  for (int64_t c = 0; c < C; ++c) {
    if (!foldable(mean[c], invstd[c])) return false;
    q[c] = -k[c] * s[c];
    r[c] = static_cast<acc_t>((static_cast<double>(mean[c]) * k[c] - a[c]) * s[c]);
  }
  map_rows_nlc<true>(x, g, out, v,
                     folded_grad_input_op(PerLane<acc_t>{s}, PerLane<acc_t>{q.data()}, PerLane<acc_t>{r.data()}),
                     Output::kGradInput, backward);
  return true;
}

// Elementwise dx for the whole view (see grad_input_op), per-channel coefficients in acc dtype.
// `backward`: the channels-last pass walks rows backwards (it follows a full read of x and dy).
template <bool kUsesX, typename scalar_t, typename acc_t>
void grad_input(const ChannelView& v, const at::Tensor& dy, const at::Tensor& dx, const acc_t* mean, const acc_t* a,
                const acc_t* k, const acc_t* s, bool backward) {
  const scalar_t* x = v.x.const_data_ptr<scalar_t>();
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  if (v.channels_last) {
    const auto op = grad_input_op<kUsesX>(PerLane<acc_t>{mean}, PerLane<acc_t>{a}, PerLane<acc_t>{k},
                                          PerLane<acc_t>{s});
    // Eval statistics read only dy: it goes in the first slot.
    if constexpr (kUsesX) {
      map_rows_nlc<true>(x, g, out, v, op, Output::kGradInput, backward);
    } else {
      map_rows_nlc<false>(g, g, out, v, [&](int64_t i, auto gi, auto) { return op(i, gi, gi); }, Output::kGradInput,
                          backward);
    }
  } else {
    const bool stream = streams_output(v, Output::kGradInput);
    const int64_t grain = std::max<int64_t>(1, kElementwiseGrain / v.L);
    at::parallel_for(0, v.N * v.C, grain, [&](int64_t s0, int64_t s1) {
      grad_input_planes<kUsesX>(x, g, out, v, s0, s1, mean, a, k, s, stream);
    });
  }
}

// dx for training statistics from the per-channel means of dy and dy * (x - mean).
at::Tensor grad_input_train(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& mean_dy,
                            const at::Tensor& mean_dy_xmu, bool backward = false) {
  at::Tensor dx = empty_output(v);
  if (v.x.numel() == 0) return dx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_grad_input_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const acc_t* invstd_p = invstd.const_data_ptr<acc_t>();
    const acc_t* mean_dy_xmu_p = mean_dy_xmu.const_data_ptr<acc_t>();
    std::vector<acc_t> k(v.C);
    for (int64_t c = 0; c < v.C; ++c) k[c] = invstd_p[c] * invstd_p[c] * mean_dy_xmu_p[c];
    const std::vector<acc_t> s = channel_products<acc_t>(invstd, weight);
    const acc_t* mean_p = mean.const_data_ptr<acc_t>();
    const acc_t* mean_dy_p = mean_dy.const_data_ptr<acc_t>();
    if (v.channels_last &&
        folded_grad_input_nlc(v, v.x.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                              dx.mutable_data_ptr<scalar_t>(), mean_p, invstd_p, mean_dy_p, k.data(), s.data(),
                              backward)) {
      return;
    }
    grad_input<true, scalar_t, acc_t>(v, dy, dx, mean_p, mean_dy_p, k.data(), s.data(), backward);
  });
  return dx;
}

at::Tensor backward_elemt(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& mean,
                          const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                          const at::Tensor& mean_dy, const at::Tensor& mean_dy_xmu) {
  const char* op = "backward_elemt";
  const ChannelView v = channel_view(input, op, grad_input_format(input, grad_output));
  const at::Tensor dy = grad_like_view(grad_output, v, op);
  return grad_input_train(v, dy, channel_vector(mean, "mean", v, op), channel_vector(invstd, "invstd", v, op),
                          channel_vector(weight, "weight", v, 1.0, op), channel_vector(mean_dy, "mean_dy", v, op),
                          channel_vector(mean_dy_xmu, "mean_dy_xmu", v, op));
}

// Channels-first training backward. Long planes: one channel at a time, its two sums, then its
// dx (segments backwards, starting on the most recently read), while the channel's x and dy are
// still in cache. Short planes: a task's channels at a time, in memory order (see
// kMemoryOrderBackwardPlane).
// Fills grad_in and the double sum tensors.
void fused_backward_ncl(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& grad_in,
                        const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu) {
  double* sdy = sum_dy.mutable_data_ptr<double>();
  double* sdx = sum_dy_xmu.mutable_data_ptr<double>();
  const double inv_count = 1.0 / static_cast<double>(v.count());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_fused_backward_cpu", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* x = v.x.const_data_ptr<scalar_t>();
    const scalar_t* g = dy.const_data_ptr<scalar_t>();
    scalar_t* dx = grad_in.mutable_data_ptr<scalar_t>();
    const acc_t* mean_p = mean.const_data_ptr<acc_t>();
    const acc_t* invstd_p = invstd.const_data_ptr<acc_t>();
    const acc_t* w_p = weight.const_data_ptr<acc_t>();
    // The per-channel coefficients of dx (grad_input_op), filled by each task for its channels
    // from their sums.
    std::vector<acc_t> coefs(3 * v.C);
    acc_t* const a = coefs.data();
    acc_t* const k = a + v.C;
    acc_t* const s = k + v.C;
    const auto set_coefs = [&](int64_t c) __attribute__((always_inline)) {
      a[c] = static_cast<acc_t>(sdy[c] * inv_count);
      k[c] = invstd_p[c] * invstd_p[c] * static_cast<acc_t>(sdx[c] * inv_count);
      s[c] = invstd_p[c] * w_p[c];
    };
    const bool stream = streams_output(v, Output::kGradInput);
    at::parallel_for(0, v.C, channel_grain(v), [&](int64_t c0, int64_t c1) {
      if (v.L < kMemoryOrderBackwardPlane) {
        // Sums in memory order, then dx image by image from the last, whose planes the sums read
        // last.
        channels_grad_sums_ncl(x, g, v, c0, c1, mean_p, true, sdy, sdx);
        for (int64_t c = c0; c < c1; ++c) set_coefs(c);
        for (int64_t n = v.N - 1; n >= 0; --n) {
          grad_input_planes<true>(x, g, dx, v, n * v.C + c0, n * v.C + c1, mean_p, a, k, s, stream);
        }
        return;
      }
      for (int64_t c = c0; c < c1; ++c) {
        std::tie(sdy[c], sdx[c]) = channel_grad_sums_ncl(x, g, v, c, mean_p[c]);
        set_coefs(c);
        const auto op = grad_input_op<true>(Scalar<acc_t>{mean_p[c]}, Scalar<acc_t>{a[c]}, Scalar<acc_t>{k[c]},
                                            Scalar<acc_t>{s[c]});
        const int64_t last = ((v.N - 1) * v.C + c) * v.L;  // planes from last to first
        map_segments<true>(x + last, g + last, dx + last, -v.C * v.L, v.N, v.L, op, stream);
      }
    });
  });
}

// (grad_weight, grad_bias) = (sum_dy_xmu * invstd, sum_dy) in param_dtype, each only where
// wanted (else a (0,) placeholder): one loop instead of a chain of small ATen ops per call.
std::tuple<at::Tensor, at::Tensor> param_grads(const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu,
                                               const at::Tensor& invstd, bool want_weight, bool want_bias,
                                               at::ScalarType param_dtype) {
  const auto options = invstd.options().dtype(param_dtype);
  const int64_t C = invstd.numel();
  at::Tensor grad_weight = want_weight ? at::empty({C}, options) : not_computed(options);
  at::Tensor grad_bias = want_bias ? at::empty({C}, options) : not_computed(options);
  const double* sdy = sum_dy.const_data_ptr<double>();
  const double* sdx = sum_dy_xmu.const_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(invstd.scalar_type(), "bn_cuda_param_grads_cpu", [&] {
    const scalar_t* inv = invstd.const_data_ptr<scalar_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param_dtype, "bn_cuda_param_grads_cpu", [&] {
      if (want_weight) {
        scalar_t* gw = grad_weight.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) gw[c] = static_cast<scalar_t>(sdx[c] * static_cast<double>(inv[c]));
      }
      if (want_bias) {
        scalar_t* gb = grad_bias.mutable_data_ptr<scalar_t>();
        for (int64_t c = 0; c < C; ++c) gb[c] = static_cast<scalar_t>(sdy[c]);
      }
    });
  });
  return {grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_output, const at::Tensor& input,
                                                        const at::Tensor& mean, const at::Tensor& invstd,
                                                        const c10::optional<at::Tensor>& weight, bool training,
                                                        std::array<bool, 3> output_mask) {
  const char* op = "backward";
  const ChannelView v = channel_view(input, op, grad_input_format(input, grad_output));
  const at::Tensor dy = grad_like_view(grad_output, v, op);
  const at::Tensor mean_acc = channel_vector(mean, "mean", v, op);
  const at::Tensor invstd_acc = channel_vector(invstd, "invstd", v, op);
  const at::Tensor w = channel_vector(weight, "weight", v, 1.0, op);
  const auto acc = acc_type(v.x.scalar_type());
  const auto param_dtype = weight.has_value() && weight->defined() ? weight->scalar_type() : acc;

  at::Tensor grad_weight = not_computed(w.options().dtype(param_dtype));
  at::Tensor grad_bias = not_computed(w.options().dtype(param_dtype));
  at::Tensor grad_in = not_computed(v.x.options());
  const bool need_sums = output_mask[1] || output_mask[2] || (training && output_mask[0]);
  if (need_sums) {
    at::Tensor sum_dy, sum_dy_xmu;
    const bool fused = training && output_mask[0] && !v.channels_last && v.count() > 0;
    if (fused) {
      grad_in = empty_output(v);
      sum_dy = at::empty({v.C}, v.x.options().dtype(at::kDouble));
      sum_dy_xmu = at::empty({v.C}, v.x.options().dtype(at::kDouble));
      fused_backward_ncl(v, dy, mean_acc, invstd_acc, w, grad_in, sum_dy, sum_dy_xmu);
    } else {
      std::tie(sum_dy, sum_dy_xmu) = grad_sums(v, dy, mean_acc);
    }
    if (output_mask[1] || output_mask[2]) {
      std::tie(grad_weight, grad_bias) =
          param_grads(sum_dy, sum_dy_xmu, invstd_acc, output_mask[1], output_mask[2], param_dtype);
    }
    if (training && output_mask[0] && !fused) {
      const double inv_count = v.count() > 0 ? 1.0 / static_cast<double>(v.count()) : 0.0;
      grad_in = grad_input_train(v, dy, mean_acc, invstd_acc, w, scaled_to(sum_dy, inv_count, acc),
                                 scaled_to(sum_dy_xmu, inv_count, acc), /*backward=*/true);
    }
  }
  if (!training && output_mask[0]) {
    grad_in = empty_output(v);
    if (v.x.numel() > 0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda_grad_input_eval_cpu", [&] {
        using acc_t = opmath_t<scalar_t>;
        const std::vector<acc_t> s = channel_products<acc_t>(invstd_acc, w);
        // Without the statistics terms only s is read; the other coefficient slots are unused.
        const acc_t* s_p = s.data();
        grad_input<false, scalar_t, acc_t>(v, dy, grad_in, s_p, s_p, s_p, s_p, need_sums);
      });
    }
  }
  return {grad_in, grad_weight, grad_bias};
}

}  // namespace

const char* cpu_isa_name() {
  return isa_name(selected_isa());
}

int64_t set_cpu_stream_mb(int64_t mb) {
  const int64_t bytes = mb < 0 ? int64_t(-1) : std::min(mb, kMaxStreamOverrideMiB) << 20;
  const int64_t previous = stream_override_bytes().exchange(bytes);
  return previous < 0 ? previous : previous >> 20;
}

std::pair<int64_t, int64_t> cpu_stream_bounds() {
  return {stream_min_bytes(Output::kNormalized), stream_min_bytes(Output::kGradInput)};
}

}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, CPU, m) {
  m.impl("stats", &bn_cuda::stats);
  m.impl("normalize", &bn_cuda::normalize);
  m.impl("forward_train", &bn_cuda::forward_train);
  m.impl("forward_eval", &bn_cuda::forward_eval);
  m.impl("backward_reduce", &bn_cuda::backward_reduce);
  m.impl("backward_elemt", &bn_cuda::backward_elemt);
  m.impl("backward", &bn_cuda::backward);
}
