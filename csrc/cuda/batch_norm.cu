// The CUDA backend of the bn_cuda ops (contracts in ops.cpp): argument checks and views from
// op_checks.h, outputs allocated here, work done by the launchers of channel_reduce.cu and
// channel_elementwise.cu, registered with TORCH_LIBRARY_IMPL(bn_cuda, CUDA, m).
//
// Every op sets a CUDAGuard on the input's device and launches on its current stream, never
// synchronizes with the host (CUDA graph capture works), and returns the documented outputs
// without launching anything for an input with no elements.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>

#include "launchers.h"
#include "op_checks.h"

namespace bn_cuda {
namespace gpu {
namespace {

using at::Tensor;
using c10::optional;

// The input's view, after checking that it is a CUDA tensor: the dispatcher picks this backend
// when any argument is on a CUDA device, so a CPU input with CUDA statistics lands here.
ChannelView cuda_view(const Tensor& input, const char* op) {
  ChannelView v = channel_view(input, op);
  TORCH_CHECK(v.x.is_cuda(), "bn_cuda.", op, ": input is on ", v.x.device(),
              " but other arguments are on a CUDA device; move all tensors to the same device");
  return v;
}

// channel_vector() for an optional argument that stays absent (undefined) when not given: the
// kernels then use 1 (weight) or 0 (bias) without allocating and filling a tensor.
Tensor optional_channel_vector(const optional<Tensor>& t, const char* name, const ChannelView& v, const char* op) {
  if (!t.has_value() || !t->defined()) {
    return Tensor();
  }
  return channel_vector(*t, name, v, op);
}

Tensor acc_vector(const ChannelView& v) {
  return at::empty({v.C}, v.x.options().dtype(acc_type(v.x.scalar_type())));
}

Tensor acc_zeros(const ChannelView& v) {
  return at::zeros({v.C}, v.x.options().dtype(acc_type(v.x.scalar_type())));
}

std::tuple<Tensor, Tensor> stats(const Tensor& input) {
  const ChannelView v = cuda_view(input, "stats");
  const c10::cuda::CUDAGuard guard(v.x.device());
  // float64 outputs whatever the input: the exchange format of cross-device merges (ops.cpp).
  const auto options = v.x.options().dtype(at::kDouble);
  if (v.x.numel() == 0) {
    return {at::zeros({v.C}, options), at::zeros({v.C}, options)};
  }
  Tensor mean = at::empty({v.C}, options);
  Tensor var = at::empty({v.C}, options);
  launch_batch_stats(v, mean, var, Tensor(), 0.0);
  return {mean, var};
}

Tensor normalize(const Tensor& input, const Tensor& mean, const Tensor& invstd, const optional<Tensor>& weight,
                 const optional<Tensor>& bias) {
  const char* op = "normalize";
  const ChannelView v = cuda_view(input, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor mean_c = channel_vector(mean, "mean", v, op);
  const Tensor invstd_c = channel_vector(invstd, "invstd", v, op);
  const Tensor weight_c = optional_channel_vector(weight, "weight", v, op);
  const Tensor bias_c = optional_channel_vector(bias, "bias", v, op);
  Tensor y = empty_like_view(v);
  if (v.x.numel() > 0) {
    launch_normalize(v, mean_c, invstd_c, /*scale_source_is_var=*/false, 0.0, weight_c, bias_c, y);
  }
  return y;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train(const Tensor& input, const optional<Tensor>& weight,
                                                         const optional<Tensor>& bias, double eps) {
  const char* op = "forward_train";
  const ChannelView v = cuda_view(input, op);
  // eps after the input, in the CPU backend's order, so both backends report the same first error.
  check_eps(eps, /*training=*/true, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor weight_c = optional_channel_vector(weight, "weight", v, op);
  const Tensor bias_c = optional_channel_vector(bias, "bias", v, op);
  Tensor y = empty_like_view(v);
  if (v.x.numel() == 0) {
    // Statistics of no values are 0 (ops.cpp); invstd keeps its definition 1/sqrt(var + eps).
    Tensor invstd = at::full({v.C}, 1.0 / std::sqrt(eps), v.x.options().dtype(acc_type(v.x.scalar_type())));
    return {y, acc_zeros(v), invstd, acc_zeros(v)};
  }
  Tensor mean = acc_vector(v);
  Tensor var = acc_vector(v);
  Tensor invstd = acc_vector(v);
  launch_batch_stats(v, mean, var, invstd, eps);
  launch_normalize(v, mean, invstd, /*scale_source_is_var=*/false, 0.0, weight_c, bias_c, y);
  return {y, mean, invstd, var};
}

Tensor forward_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                    const optional<Tensor>& weight, const optional<Tensor>& bias, double eps) {
  const char* op = "forward_eval";
  const ChannelView v = cuda_view(input, op);
  // eps after the input, in the CPU backend's order, so both backends report the same first error.
  check_eps(eps, /*training=*/false, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor mean_c = channel_vector(running_mean, "running_mean", v, op);
  const Tensor var_c = channel_vector(running_var, "running_var", v, op);
  const Tensor weight_c = optional_channel_vector(weight, "weight", v, op);
  const Tensor bias_c = optional_channel_vector(bias, "bias", v, op);
  Tensor y = empty_like_view(v);
  if (v.x.numel() > 0) {
    launch_normalize(v, mean_c, var_c, /*scale_source_is_var=*/true, eps, weight_c, bias_c, y);
  }
  return y;
}

std::tuple<Tensor, Tensor> backward_reduce(const Tensor& grad_output, const Tensor& input, const Tensor& mean) {
  const char* op = "backward_reduce";
  const ChannelView v = cuda_view(input, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor dy = grad_like_view(grad_output, v, op);
  const Tensor mean_c = channel_vector(mean, "mean", v, op);
  if (v.x.numel() == 0) {
    return {acc_zeros(v), acc_zeros(v)};
  }
  Tensor sum_dy = acc_vector(v);
  Tensor sum_dy_xmu = acc_vector(v);
  launch_grad_sums(v, dy, mean_c, sum_dy, sum_dy_xmu);
  return {sum_dy, sum_dy_xmu};
}

Tensor backward_elemt(const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& invstd,
                      const optional<Tensor>& weight, const Tensor& mean_dy, const Tensor& mean_dy_xmu) {
  const char* op = "backward_elemt";
  const ChannelView v = cuda_view(input, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor dy = grad_like_view(grad_output, v, op);
  const Tensor mean_c = channel_vector(mean, "mean", v, op);
  const Tensor invstd_c = channel_vector(invstd, "invstd", v, op);
  const Tensor weight_c = optional_channel_vector(weight, "weight", v, op);
  const Tensor mean_dy_c = channel_vector(mean_dy, "mean_dy", v, op);
  const Tensor mean_dy_xmu_c = channel_vector(mean_dy_xmu, "mean_dy_xmu", v, op);
  Tensor dx = empty_like_view(v);
  if (v.x.numel() > 0) {
    launch_backward_train(v, dy, mean_c, invstd_c, weight_c, mean_dy_c, mean_dy_xmu_c, /*mean_scale=*/1.0, dx);
  }
  return dx;
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_output, const Tensor& input, const Tensor& mean,
                                            const Tensor& invstd, const optional<Tensor>& weight, bool training,
                                            std::array<bool, 3> output_mask) {
  const char* op = "backward";
  const ChannelView v = cuda_view(input, op);
  const c10::cuda::CUDAGuard guard(v.x.device());
  const Tensor dy = grad_like_view(grad_output, v, op);
  const Tensor mean_c = channel_vector(mean, "mean", v, op);
  const Tensor invstd_c = channel_vector(invstd, "invstd", v, op);
  const Tensor weight_c = optional_channel_vector(weight, "weight", v, op);
  const bool want_dx = output_mask[0];
  const bool want_dw = output_mask[1];
  const bool want_db = output_mask[2];
  // grad_weight / grad_bias take the weight's dtype, acc when there is no weight.
  const at::ScalarType param_dtype = weight_c.defined() ? weight->scalar_type() : acc_type(v.x.scalar_type());
  const at::TensorOptions param_options = v.x.options().dtype(param_dtype);
  const bool empty = v.x.numel() == 0;

  // The reduction is needed for grad_weight, grad_bias, and for dx through batch statistics; eval
  // mode asking for dx alone skips it (one pass over dy only).
  Tensor sum_dy;
  Tensor sum_dy_xmu;
  if (want_dw || want_db || (want_dx && training)) {
    if (empty) {
      sum_dy = acc_zeros(v);
      sum_dy_xmu = acc_zeros(v);
    } else {
      sum_dy = acc_vector(v);
      sum_dy_xmu = acc_vector(v);
      launch_grad_sums(v, dy, mean_c, sum_dy, sum_dy_xmu);
    }
  }

  Tensor grad_input = want_dx ? empty_like_view(v) : not_computed(v.x.options());
  if (want_dx && !empty) {
    if (training) {
      launch_backward_train(v, dy, mean_c, invstd_c, weight_c, sum_dy, sum_dy_xmu,
                            /*mean_scale=*/1.0 / static_cast<double>(v.count()), grad_input);
    } else {
      launch_backward_eval(v, dy, invstd_c, weight_c, grad_input);
    }
  }
  Tensor grad_weight = want_dw ? (sum_dy_xmu * invstd_c).to(param_dtype) : not_computed(param_options);
  Tensor grad_bias = want_db ? sum_dy.to(param_dtype) : not_computed(param_options);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace
}  // namespace gpu
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, CUDA, m) {
  m.impl("stats", &bn_cuda::gpu::stats);
  m.impl("normalize", &bn_cuda::gpu::normalize);
  m.impl("forward_train", &bn_cuda::gpu::forward_train);
  m.impl("forward_eval", &bn_cuda::gpu::forward_eval);
  m.impl("backward_reduce", &bn_cuda::gpu::backward_reduce);
  m.impl("backward_elemt", &bn_cuda::gpu::backward_elemt);
  m.impl("backward", &bn_cuda::gpu::backward);
}
