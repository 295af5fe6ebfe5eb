// The kernel launchers that the CUDA ops (batch_norm.cu, running_stats.cpp) compose. Each launches
// on the current CUDA stream of the current device, with no host synchronization. The batch-norm
// launchers take the input's ChannelView (op_checks.h) with v.x.numel() > 0, per-channel tensors
// already made contiguous (C,) acc-dtype by channel_vector() and outputs allocated by the caller,
// who holds a CUDAGuard; the running-statistics launcher sets its own guard.
#pragma once

#include <ATen/ATen.h>

#include "op_checks.h"

namespace bn_cuda {
namespace gpu {

// Per-channel batch statistics of v.x: mean and biased var ((C,), both acc or both float64), and,
// when `invstd` is defined, invstd = 1 / sqrt(var + eps) (acc). Bitwise deterministic.
void launch_batch_stats(const ChannelView& v, const at::Tensor& mean, const at::Tensor& var,
                        const at::Tensor& invstd, double eps);

// Per-channel gradient sums: sum_dy = sum(dy), sum_dy_xmu = sum(dy * (x - mean)) (acc, (C,)).
// dy is dense in v.format (grad_like_view). Bitwise deterministic.
void launch_grad_sums(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                      const at::Tensor& sum_dy, const at::Tensor& sum_dy_xmu);

// out = (x - mean) * (invstd * weight) + bias per channel, out shaped and laid out like v.x.
// `scale_source` is invstd, or, when `scale_source_is_var`, a variance turned into
// invstd = 1 / sqrt(var + eps) per channel (the eval forward from running_var). weight and bias
// may be undefined (1 and 0).
void launch_normalize(const ChannelView& v, const at::Tensor& mean, const at::Tensor& scale_source,
                      bool scale_source_is_var, double eps, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& out);

// Training-statistics input gradient, per channel:
//   dx = (dy - mean_dy * k - (x - mean) * invstd^2 * mean_dy_xmu * k) * invstd * weight
// where k = `mean_scale` turns the given sums into means (1 / count) or is 1 when they are
// already means. weight may be undefined (1).
void launch_backward_train(const ChannelView& v, const at::Tensor& dy, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& mean_dy,
                           const at::Tensor& mean_dy_xmu, double mean_scale, const at::Tensor& dx);

// Running-statistics input gradient: dx = dy * invstd * weight per channel; does not read x.
void launch_backward_eval(const ChannelView& v, const at::Tensor& dy, const at::Tensor& invstd,
                          const at::Tensor& weight, const at::Tensor& dx);

// Running statistics in place, one launch: per channel c,
//   running_mean = (1 - f) * running_mean + f * mean
//   running_var  = (1 - f) * running_var  + f * var * n / (n - 1)
// in the statistics' dtype. running_* are contiguous (C,) float, double, half or bfloat16; mean, var
// contiguous (C,) float or double, the same. f = momentum, or 1 / tracked (a one-element int64
// tensor, the already incremented num_batches_tracked) when momentum is empty. n = count > 1, or,
// when count_dev (a one-element float64 tensor) is defined, the count read on the device, where
// n <= 0 leaves the buffers unchanged. All tensors on one CUDA device.
void launch_update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                 const at::Tensor& count_dev, c10::optional<double> momentum,
                                 const at::Tensor& tracked);

}  // namespace gpu
}  // namespace bn_cuda
