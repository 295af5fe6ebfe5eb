// Per-channel elementwise passes over the (N, C, L) view: normalize (training and eval forward)
// and the input gradient (training and eval backward). One kernel per memory order, templated on
// an Op that computes per-channel coefficients once and applies them to each value; values are
// read and written with 16-byte packs where layout.cuh allows.
//
// Numerics: y = (x - mean) * scale + shift, never x * scale + (shift - mean * scale). At mean 1e4
// and std 1e-2 in float32, mean * scale is ~1e6 and its rounding error (~0.06) would swamp outputs
// of order 1; x - mean is exact instead (Sterbenz). The backward pass keeps (x - mean) likewise.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "launch_policy.h"
#include "launchers.h"
#include "layout.cuh"

namespace bn_cuda {
namespace gpu {
namespace {

// An Op describes one elementwise pass:
//   Coef channel(c)                 per-channel coefficients, computed once per channel per thread
//   acc_t apply(coef, a, b)         one output value from input a (and b when kInputs == 2)
//   a, b, out                       inputs and output, dense in the view's order

// y = (x - mean) * (invstd * weight) + bias; invstd given, or 1 / sqrt(var + eps) from a variance.
template <typename scalar_t_>
struct NormalizeOp {
  using scalar_t = scalar_t_;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  static constexpr int kInputs = 1;
  struct Coef {
    acc_t mean;
    acc_t scale;
    acc_t shift;
  };

  const scalar_t* a;  // x
  const scalar_t* b;  // unused
  scalar_t* out;      // y
  const acc_t* mean;
  const acc_t* scale_source;  // invstd, or var when scale_source_is_var
  const acc_t* weight;        // null: 1
  const acc_t* bias;          // null: 0
  acc_t eps;
  bool scale_source_is_var;

  __device__ Coef channel(int64_t c) const {
    const acc_t invstd = scale_source_is_var ? acc_t(1) / sqrt(scale_source[c] + eps) : scale_source[c];
    Coef k;
    k.mean = mean[c];
    k.scale = weight != nullptr ? invstd * weight[c] : invstd;
    k.shift = bias != nullptr ? bias[c] : acc_t(0);
    return k;
  }

  __device__ acc_t apply(const Coef& k, acc_t x, acc_t) const { return (x - k.mean) * k.scale + k.shift; }
};

// dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight, with mean_dy and
// mean_dy_xmu the given per-channel values times mean_scale.
template <typename scalar_t_>
struct BackwardTrainOp {
  using scalar_t = scalar_t_;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  static constexpr int kInputs = 2;
  struct Coef {
    acc_t mean;
    acc_t mean_dy;
    acc_t xmu_scale;  // invstd^2 * mean_dy_xmu
    acc_t out_scale;  // invstd * weight
  };

  const scalar_t* a;  // dy
  const scalar_t* b;  // x
  scalar_t* out;      // dx
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;  // null: 1
  const acc_t* mean_dy;
  const acc_t* mean_dy_xmu;
  acc_t mean_scale;

  __device__ Coef channel(int64_t c) const {
    const acc_t istd = invstd[c];
    Coef k;
    k.mean = mean[c];
    k.mean_dy = mean_dy[c] * mean_scale;
    k.xmu_scale = istd * istd * (mean_dy_xmu[c] * mean_scale);
    k.out_scale = weight != nullptr ? istd * weight[c] : istd;
    return k;
  }

  __device__ acc_t apply(const Coef& k, acc_t dy, acc_t x) const {
    return (dy - k.mean_dy - (x - k.mean) * k.xmu_scale) * k.out_scale;
  }
};

// dx = dy * invstd * weight (running statistics are constants of the graph).
template <typename scalar_t_>
struct BackwardEvalOp {
  using scalar_t = scalar_t_;
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  static constexpr int kInputs = 1;
  struct Coef {
    acc_t scale;
  };

  const scalar_t* a;  // dy
  const scalar_t* b;  // unused
  scalar_t* out;      // dx
  const acc_t* invstd;
  const acc_t* weight;  // null: 1

  __device__ Coef channel(int64_t c) const {
    Coef k;
    k.scale = weight != nullptr ? invstd[c] * weight[c] : invstd[c];
    return k;
  }

  __device__ acc_t apply(const Coef& k, acc_t dy, acc_t) const { return dy * k.scale; }
};

// One output pack from input packs pa (and pb). Lane j uses coefficients k[j * kCoefStride]:
// stride 0 when all lanes share a channel (NCHW), 1 when lane j is channel j of a row pack.
template <class Op, int V, int kCoefStride>
__device__ inline Pack<typename Op::scalar_t, V> apply_pack(const Op& op, const typename Op::Coef* k,
                                                            const Pack<typename Op::scalar_t, V>& pa,
                                                            const Pack<typename Op::scalar_t, V>& pb) {
  using scalar_t = typename Op::scalar_t;
  using acc_t = typename Op::acc_t;
  Pack<scalar_t, V> o;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    acc_t second = acc_t(0);
    if constexpr (Op::kInputs == 2) second = static_cast<acc_t>(pb.v[j]);
    o.v[j] = static_cast<scalar_t>(op.apply(k[j * kCoefStride], static_cast<acc_t>(pa.v[j]), second));
  }
  return o;
}

// NCHW pass. Grid (split, min(C, 65535)), block of 32..256 threads. Block (bx, by) handles slice
// bx of channels by, by + gridDim.y, ...; its threads walk the channel's packs (PlaneWalk),
// nchw_chunk(V) loads in flight before the stores.
template <class Op, int V, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    nchw_elementwise_kernel(const Op op, const index_t N, const index_t C, const index_t Lv) {
  using scalar_t = typename Op::scalar_t;
  constexpr int U = nchw_chunk(V);
  const PlaneWalk<index_t> walk(C, Lv, static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                                static_cast<index_t>(gridDim.x) * blockDim.x);
  for (index_t c = blockIdx.y; c < C; c += gridDim.y) {
    const typename Op::Coef coef = op.channel(static_cast<int64_t>(c));
    auto cur = walk.start(c);
    while (cur.n < N) {
      Pack<scalar_t, V> pa[U];
      Pack<scalar_t, V> pb[U];
      index_t offset[U];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (cur.n < N) {  // once false, false for the rest of the chunk
          offset[u] = cur.offset;
          pa[u] = load_pack<V>(op.a, cur.offset);
          if constexpr (Op::kInputs == 2) pb[u] = load_pack<V>(op.b, cur.offset);
          loaded = u + 1;
          walk.advance(cur);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < loaded) store_pack<V>(op.out, offset[u], apply_pack<Op, V, 0>(op, &coef, pa[u], pb[u]));
      }
    }
  }
}

// Rows (channels-last) pass over an (R, Cv) array of packs. Grid (ceil(Cv / tx), split), block
// (tx, ty). Thread (x, y) owns column pack cv = bx * tx + x (its V channels' coefficients stay in
// registers) and rows by * ty + y, then every gridDim.y * ty rows, rows_chunk(V) at a time.
template <class Op, int V, typename index_t>
__global__ void __launch_bounds__(kMaxThreads)
    rows_elementwise_kernel(const Op op, const index_t R, const index_t Cv) {
  using scalar_t = typename Op::scalar_t;
  constexpr int U = rows_chunk(V);
  const index_t row_step = static_cast<index_t>(gridDim.y) * blockDim.y;
  const index_t column_step = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t cv = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; cv < Cv; cv += column_step) {
    typename Op::Coef coef[V];
#pragma unroll
    for (int j = 0; j < V; ++j) coef[j] = op.channel(static_cast<int64_t>(cv) * V + j);
    for (index_t r = static_cast<index_t>(blockIdx.y) * blockDim.y + threadIdx.y; r < R;) {
      Pack<scalar_t, V> pa[U];
      Pack<scalar_t, V> pb[U];
      index_t offset[U];
      int loaded = 0;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (r < R) {  // once false, false for the rest of the chunk
          offset[u] = r * Cv + cv;
          pa[u] = load_pack<V>(op.a, offset[u]);
          if constexpr (Op::kInputs == 2) pb[u] = load_pack<V>(op.b, offset[u]);
          loaded = u + 1;
          r += row_step;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (u < loaded) store_pack<V>(op.out, offset[u], apply_pack<Op, V, 1>(op, coef, pa[u], pb[u]));
      }
    }
  }
}

// Each thread gets at least one chunk; with more work the grid-stride loops take over, with up to
// this many device-fills of blocks in the grid.
constexpr int64_t kElementwiseWaves = 4;

// Launches the pass `op` over the view: picks the pack width, the index type and the launch shape.
template <class Op>
void launch_elementwise(const Op& op, const ChannelView& v) {
  using scalar_t = typename Op::scalar_t;
  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool vectorize = aligned16(op.a) && aligned16(op.b) && aligned16(op.out) &&
                         (v.channels_last ? v.C : v.L) % kVec == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_index_type(v.x.numel(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    dispatch_vector_width<kVec>(vectorize, [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      if (v.channels_last) {
        const LaunchShape shape = rows_shape(v.count(), v.C / V, rows_chunk(V), 1, kElementwiseWaves);
        rows_elementwise_kernel<Op, V, index_t><<<shape.grid, shape.block, 0, stream>>>(
            op, static_cast<index_t>(v.count()), static_cast<index_t>(v.C / V));
      } else {
        const LaunchShape shape = nchw_shape(v.C, ceil_div(v.N * (v.L / V), nchw_chunk(V)), 1, kElementwiseWaves);
        nchw_elementwise_kernel<Op, V, index_t><<<shape.grid, shape.block, 0, stream>>>(
            op, static_cast<index_t>(v.N), static_cast<index_t>(v.C), static_cast<index_t>(v.L / V));
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

template <typename T>
const T* maybe_data(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

}  // namespace

void launch_normalize(const ChannelView& v, const at::Tensor& mean, const at::Tensor& scale_source,
                      bool scale_source_is_var, double eps, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda.normalize", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    NormalizeOp<scalar_t> op{};
    op.a = v.x.const_data_ptr<scalar_t>();
    op.b = nullptr;
    op.out = out.data_ptr<scalar_t>();
    op.mean = mean.const_data_ptr<acc_t>();
    op.scale_source = scale_source.const_data_ptr<acc_t>();
    op.weight = maybe_data<acc_t>(weight);
    op.bias = maybe_data<acc_t>(bias);
    op.eps = static_cast<acc_t>(eps);
    op.scale_source_is_var = scale_source_is_var;
    launch_elementwise(op, v);
  });
}

void launch_backward_train(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& mean_dy,
                           const at::Tensor& mean_dy_xmu, double mean_scale, const at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda.backward_train", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    BackwardTrainOp<scalar_t> op{};
    op.a = dy.const_data_ptr<scalar_t>();
    op.b = v.x.const_data_ptr<scalar_t>();
    op.out = dx.data_ptr<scalar_t>();
    op.mean = mean.const_data_ptr<acc_t>();
    op.invstd = invstd.const_data_ptr<acc_t>();
    op.weight = maybe_data<acc_t>(weight);
    op.mean_dy = mean_dy.const_data_ptr<acc_t>();
    op.mean_dy_xmu = mean_dy_xmu.const_data_ptr<acc_t>();
    op.mean_scale = static_cast<acc_t>(mean_scale);
    launch_elementwise(op, v);
  });
}

void launch_backward_eval(const ChannelView& v, const at::Tensor& dy, const at::Tensor& invstd,
                          const at::Tensor& weight, const at::Tensor& dx) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.x.scalar_type(), "bn_cuda.backward_eval", [&] {
    using acc_t = at::acc_type<scalar_t, true>;
    BackwardEvalOp<scalar_t> op{};
    op.a = dy.const_data_ptr<scalar_t>();
    op.b = nullptr;
    op.out = dx.data_ptr<scalar_t>();
    op.invstd = invstd.const_data_ptr<acc_t>();
    op.weight = maybe_data<acc_t>(weight);
    launch_elementwise(op, v);
  });
}

}  // namespace gpu
}  // namespace bn_cuda
