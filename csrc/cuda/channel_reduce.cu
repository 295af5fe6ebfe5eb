// Per-channel reductions over the (N, C, L) view: the batch statistics (Welford / Chan) and the
// two gradient sums of the backward pass. One kernel per memory order, templated on a Reducer
// that says what one thread accumulates; a second small kernel merges per-block partials when a
// channel is split over several blocks. No atomics: results are bitwise deterministic.
//
// Statistics numerics. x = 1e4 + N(0, 1e-2) in float32 must give the variance to 1e-4 relative.
// A float32 mean near 1e4 is only known to half an ulp (~5e-4, i.e. 5% of a standard
// deviation), so neither per-thread Welford (the running mean stalls once delta / count drops
// below half an ulp) nor a tree of Chan merges of unshifted partial means (each merge adds
// count * (error of the means)^2 to m2) survives it. We therefore:
//   1. subtract a per-channel pivot p, the channel's first value, from every value: x - p is exact
//      in float32 (Sterbenz) for values within a factor 2 of p, and its mean is of the order of
//      the standard deviation, so partial means keep their full relative precision;
//   2. per thread, take a chunk of 8 to 32 values from registers (layout.cuh), compute its mean
//      and then its m2 around that mean (a two-pass: no E[x^2] - E[x]^2 cancellation), and fold
//      the chunk into the thread's state with Chan's merge (welford.h): two divisions per chunk
//      rather than one per value, and no long float32 running sums;
//   3. merge thread states across the warp (shuffles), the block (shared memory) and the blocks
//      of a split channel (a second kernel), always with Chan's merge in a fixed order;
//   4. mean = p + shifted mean at the end; the variance does not depend on the shift.
// The remaining weakness is a pivot far out in the tail of its channel: |p - mean| of k standard
// deviations rounds each x - p by up to k * eps standard deviations, about 2 k eps relative on the
// variance, far milder than the failure of the unshifted schemes above. Checked in a float32
// emulation of this exact order: ~1e-7 relative at mean 1e4 and 1e5, std 1e-2.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "launch_policy.h"
#include "launchers.h"
#include "layout.cuh"
#include "reduce.cuh"
#include "welford.h"

namespace bn_cuda {
namespace gpu {
namespace {

// A Reducer describes one per-channel reduction:
//   State                         what a thread accumulates; combine() / shfl_down() in reduce.cuh
//   Context channel(c)            per-channel constants, read once per channel
//   accumulate<K>(s, ctx, a, b, count)   folds the first `count` of K values of input a (and b)
//   finalize(c, s, ctx)           writes the channel's result
//   a, b                          the inputs (b only when kInputs == 2), dense in the view's order

// Batch statistics of x. Outputs ((C,)): mean and biased var, either in acc (mean, var) or in
// float64 (mean64, var64: the stats op's exchange format, where pivot + shifted mean is summed in
// double so the float32 rounding of a large mean is not baked in); the other pair is null. Also
// invstd = 1/sqrt(var + eps) (acc) when `invstd` is not null.
template <typename scalar_t_>
struct StatsReducer {
  using scalar_t = scalar_t_;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using State = WelfordState<acc_t>;
  using Context = acc_t;  // the pivot: the channel's first value
  static constexpr int kInputs = 1;

  const scalar_t* a;  // x
  const scalar_t* b;  // unused
  int64_t pivot_stride;  // elements between channels' first values: L (NCHW) or 1 (rows)
  acc_t* mean;
  acc_t* var;
  double* mean64;
  double* var64;
  acc_t* invstd;
  acc_t eps;

  __device__ Context channel(int64_t c) const { return static_cast<acc_t>(a[c * pivot_stride]); }

  template <int K>
  __device__ void accumulate(State& s, const Context& pivot, const acc_t (&x)[K], const acc_t (&)[K],
                             int count) const {
    acc_t sum = acc_t(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < count) sum += x[k] - pivot;
    }
    State chunk;
    chunk.count = count;
    chunk.mean = sum / static_cast<acc_t>(count);
    acc_t m2 = acc_t(0);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < count) {
        const acc_t d = (x[k] - pivot) - chunk.mean;
        m2 += d * d;
      }
    }
    chunk.m2 = m2;
    s = welford_merge(s, chunk);
  }

  __device__ void finalize(int64_t c, const State& s, const Context& pivot) const {
    const acc_t v = welford_variance(s);
    if (mean != nullptr) {
      mean[c] = pivot + s.mean;
      var[c] = v;
    } else {
      mean64[c] = static_cast<double>(pivot) + static_cast<double>(s.mean);
      var64[c] = static_cast<double>(v);
    }
    if (invstd != nullptr) {
      invstd[c] = acc_t(1) / sqrt(v + eps);
    }
  }
};

// Gradient sums. Outputs (acc, (C,)): sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)).
// Each chunk is summed on its own first, so a thread's running sums grow by one addition per
// chunk rather than per value.
template <typename scalar_t_>
struct GradSumsReducer {
  using scalar_t = scalar_t_;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using State = SumPair<acc_t>;
  using Context = acc_t;  // the channel's mean
  static constexpr int kInputs = 2;

  const scalar_t* a;  // dy
  const scalar_t* b;  // x
  const acc_t* mean;
  acc_t* sum_dy;
  acc_t* sum_dy_xmu;

  __device__ Context channel(int64_t c) const { return mean[c]; }

  template <int K>
  __device__ void accumulate(State& s, const Context& m, const acc_t (&dy)[K], const acc_t (&x)[K],
                             int count) const {
    State chunk;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      if (k < count) {
        chunk.first += dy[k];
        chunk.second += dy[k] * (x[k] - m);
      }
    }
    s = combine(s, chunk);
  }

  __device__ void finalize(int64_t c, const State& s, const Context&) const {
    sum_dy[c] = s.first;
    sum_dy_xmu[c] = s.second;
  }
};

// NCHW reduction. Grid (split, min(C, 65535)), block of 32..256 threads (a multiple of 32).
// Block (bx, by) reduces slice bx of split of channels by, by + gridDim.y, ...: its threads walk
// the channel's packs (PlaneWalk), loading nchw_chunk(V) packs before accumulating them. With
// gridDim.x == 1 the block writes the channel's result; otherwise it writes its partial State to
// partials[c * gridDim.x + bx] for merge_partials_kernel.
template <class Reducer, int V, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    nchw_reduce_kernel(const Reducer red, const index_t N, const index_t C, const index_t Lv,
                       typename Reducer::State* __restrict__ partials) {
  using scalar_t = typename Reducer::scalar_t;
  using acc_t = typename Reducer::acc_t;
  using State = typename Reducer::State;
  constexpr int U = nchw_chunk(V);
  constexpr int K = U * V;
  __shared__ SharedArray<State, kWarpSize> slots;

  const PlaneWalk<index_t> walk(C, Lv, static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                static_cast<index_t>(gridDim.x) * blockDim.x);
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    const auto ctx = red.channel(static_cast<int64_t>(c));
    State s;
    auto cur = walk.start(c);
    while (cur.n < N) {
      Pack<scalar_t, V> pa[U];
      Pack<scalar_t, V> pb[U];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (cur.n < N) {  // once false, false for the rest of the chunk
          pa[u] = load_pack<V>(red.a, cur.offset);
          if constexpr (Reducer::kInputs == 2) pb[u] = load_pack<V>(red.b, cur.offset);
          loaded = u + 1;
          walk.advance(cur);
        }
      }
      acc_t xa[K];
      acc_t xb[K];
#pragma unroll
      for (int u = 0; u < U; ++u) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          xa[u * V + j] = u < loaded ? static_cast<acc_t>(pa[u].v[j]) : acc_t(0);
          if constexpr (Reducer::kInputs == 2) {
            xb[u * V + j] = u < loaded ? static_cast<acc_t>(pb[u].v[j]) : acc_t(0);
          } else {
            xb[u * V + j] = acc_t(0);
          }
        }
      }
      red.accumulate(s, ctx, xa, xb, loaded * V);
    }
    s = block_reduce(s, slots.data());
    if (threadIdx.x == 0) {
      if (gridDim.x == 1) {
        red.finalize(static_cast<int64_t>(c), s, ctx);
      } else {
        partials[static_cast<int64_t>(c) * gridDim.x + blockIdx.x] = s;
      }
    }
  }
}

// Rows (channels-last) reduction over an (R, Cv) array of packs. Grid (ceil(Cv / tx), split),
// block (tx, ty) with ty a power of two. Thread (x, y) owns the V channels of column pack
// cv = bx * tx + x and reads rows by * ty + y, then every gridDim.y * ty rows, rows_chunk(V) rows
// at a time; each of its V lanes keeps its own State. The column of threads is then reduced
// through shared memory; with gridDim.y == 1 threads y == 0 write the channels' results, otherwise
// the partial States to partials[c * gridDim.y + by].
template <class Reducer, int V, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    rows_reduce_kernel(const Reducer red, const index_t R, const index_t Cv,
                       typename Reducer::State* __restrict__ partials) {
  using scalar_t = typename Reducer::scalar_t;
  using acc_t = typename Reducer::acc_t;
  using State = typename Reducer::State;
  using Context = typename Reducer::Context;
  constexpr int U = rows_chunk(V);
  __shared__ SharedArray<State, kMaxThreads> slots;

  const index_t cv = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = cv < Cv;
  const index_t row_step = static_cast<index_t>(gridDim.y) * blockDim.y;
  State s[V];
  Context ctx[V];
  if (active) {
#pragma unroll
    for (int j = 0; j < V; ++j) ctx[j] = red.channel(static_cast<int64_t>(cv) * V + j);
    for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;) {
      Pack<scalar_t, V> pa[U];
      Pack<scalar_t, V> pb[U];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r < R) {  // once false, false for the rest of the chunk
          pa[u] = load_pack<V>(red.a, r * Cv + cv);
          if constexpr (Reducer::kInputs == 2) pb[u] = load_pack<V>(red.b, r * Cv + cv);
          loaded = u + 1;
          r += row_step;
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc_t xa[U];
        acc_t xb[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          xa[u] = u < loaded ? static_cast<acc_t>(pa[u].v[j]) : acc_t(0);
          if constexpr (Reducer::kInputs == 2) {
            xb[u] = u < loaded ? static_cast<acc_t>(pb[u].v[j]) : acc_t(0);
          } else {
            xb[u] = acc_t(0);
          }
        }
        red.accumulate(s[j], ctx[j], xa, xb, loaded);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const State t = column_reduce(s[j], slots.data());  // every thread takes part
    if (threadIdx.y == 0 && active) {
      const int64_t c = static_cast<int64_t>(cv) * V + j;
      if (gridDim.y == 1) {
        red.finalize(c, t, ctx[j]);
      } else {
        partials[c * gridDim.y + blockIdx.y] = t;
      }
    }
  }
}

// Merges the `split` partial States of each channel, partials[c * split + i], and writes the
// channel's result. Block (32, 8): one warp per channel, lanes take partials lane, lane + 32, ...
// in order, then a warp tree; grid-stride over channels.
template <class Reducer>
__global__ void __launch_bounds__(kMaxThreads)
    merge_partials_kernel(const Reducer red, const typename Reducer::State* __restrict__ partials,
                          const int64_t C, const int64_t split) {
  using State = typename Reducer::State;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; c < C; c += warps) {
    State s;
    for (int64_t i = threadIdx.x; i < split; i += kWarpSize) {
      s = combine(s, partials[c * split + i]);
    }
    s = warp_reduce(s);  // c is the same for the whole warp, so all its lanes are here
    if (threadIdx.x == 0) {
      red.finalize(c, s, red.channel(c));
    }
  }
}

// Each thread should get at least this many chunks before a block is worth its reduction.
constexpr int64_t kReduceChunksPerThread = 4;

// Launches the reduction `red` over the view: picks the pack width, the index type and the launch
// shape, and runs the merge kernel when a channel was split. The workspace for partials comes
// from the caching allocator on the current stream, so freeing it here is stream-ordered.
template <class Reducer>
void launch_reduce(const Reducer& red, const ChannelView& v) {
  using scalar_t = typename Reducer::scalar_t;
  using State = typename Reducer::State;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorize =
      aligned16(red.a) && aligned16(red.b) && (v.channels_last ? v.C : v.L) % kVec == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_index_type(v.x.numel(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    dispatch_vector_width<kVec>(vectorize, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      const LaunchShape shape =
          v.channels_last
              ? rows_shape(v.count(), v.C / V, rows_chunk(V), kReduceChunksPerThread, /*waves=*/1)
              : nchw_shape(v.C, ceil_div(v.N * (v.L / V), nchw_chunk(V)), kReduceChunksPerThread, /*waves=*/1);
      const int64_t split = v.channels_last ? shape.grid.y : shape.grid.x;
      at::Tensor workspace;
      State* partials = nullptr;
      if (split > 1) {
        workspace = at::empty({v.C * split * static_cast<int64_t>(sizeof(State))}, v.x.options().dtype(at::kByte));
        partials = reinterpret_cast<State*>(workspace.data_ptr());
      }
      if (v.channels_last) {
        rows_reduce_kernel<Reducer, V, index_t><<<shape.grid, shape.block, 0, stream>>>(
            red, static_cast<index_t>(v.count()), static_cast<index_t>(v.C / V), partials);
      } else {
        nchw_reduce_kernel<Reducer, V, index_t><<<shape.grid, shape.block, 0, stream>>>(
            red, static_cast<index_t>(v.N), static_cast<index_t>(v.C), static_cast<index_t>(v.L / V), partials);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (split > 1) {
        constexpr int kChannelsPerBlock = kMaxThreads / kWarpSize;
        const dim3 block(kWarpSize, kChannelsPerBlock);
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(v.C, kChannelsPerBlock), kMaxGridY)));
        merge_partials_kernel<Reducer><<<grid, block, 0, stream>>>(red, partials, v.C, split);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

template <typename T>
T* maybe_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // namespace

void launch_batch_stats(const ChannelView& v, const at::Tensor& mean, const at::Tensor& var,
                        const at::Tensor& invstd, double eps) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda.batch_stats", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    StatsReducer<scalar_t> red{};
    red.a = v.x.const_data_ptr<scalar_t>();
    red.b = nullptr;
    red.pivot_stride = v.channels_last ? 1 : v.L;
    if (mean.scalar_type() == at::kDouble) {
      red.mean64 = mean.data_ptr<double>();
      red.var64 = var.data_ptr<double>();
    } else {
      red.mean = mean.data_ptr<acc_t>();
      red.var = var.data_ptr<acc_t>();
    }
    red.invstd = maybe_data<acc_t>(invstd);
    red.eps = static_cast<acc_t>(eps);
    launch_reduce(red, v);
  });
}

void launch_grad_sums(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda.grad_sums", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    GradSumsReducer<scalar_t> red{};
    red.a = dy.const_data_ptr<scalar_t>();
    red.b = v.x.const_data_ptr<scalar_t>();
    red.mean = mean.const_data_ptr<acc_t>();
    red.sum_dy = sum_dy.data_ptr<acc_t>();
    red.sum_dy_xmu = sum_dy_xmu.data_ptr<acc_t>();
    launch_reduce(red, v);
  });
}

}  // namespace gpu
}  // namespace bn_cuda
