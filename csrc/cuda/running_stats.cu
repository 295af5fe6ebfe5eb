// The running-statistics update of the CUDA backend as one kernel (contract in launchers.h).
//
// The device-generic update of running_stats.cpp is about ten small ATen ops (scale the variance,
// two products and a sum per buffer, copies back), each a kernel launch and several microseconds
// of host time: on small layers more than the batch-norm kernels themselves. This kernel does the
// same arithmetic, in the same precision (the statistics' dtype: float, or double for float64),
// with one thread per channel and one launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "launchers.h"

namespace bn_cuda {
namespace gpu {
namespace {

constexpr int kUpdateThreads = 256;

// running_* (run_t) move toward the batch's mean and unbiased var (stat_t). The factor is
// `momentum`, or 1 / *tracked with tracked != nullptr. The count is `count`, or *count_dev with
// count_dev != nullptr; a device count <= 0 leaves the buffers as they are (an empty batch).
template <typename run_t, typename stat_t>
__global__ void __launch_bounds__(kUpdateThreads)
    update_running_stats_kernel(run_t* __restrict__ running_mean, run_t* __restrict__ running_var,
                                const stat_t* __restrict__ mean, const stat_t* __restrict__ var, int64_t C,
                                stat_t momentum, stat_t keep_momentum, stat_t unbias,
                                const int64_t* __restrict__ tracked, const double* __restrict__ count_dev) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  if (count_dev != nullptr) {
    const stat_t n = static_cast<stat_t>(*count_dev);
    if (!(n > stat_t(0))) return;
    unbias = n / (n - stat_t(1));  // infinite for one value, as in nn.SyncBatchNorm
  }
  stat_t factor = momentum;
  stat_t keep = keep_momentum;
  if (tracked != nullptr) {
    factor = stat_t(1) / static_cast<stat_t>(*tracked);
    keep = stat_t(1) - factor;
  }
  const stat_t new_mean = factor * mean[c] + keep * static_cast<stat_t>(running_mean[c]);
  const stat_t new_var = factor * (var[c] * unbias) + keep * static_cast<stat_t>(running_var[c]);
  running_mean[c] = static_cast<run_t>(new_mean);
  running_var[c] = static_cast<run_t>(new_var);
}

}  // namespace

void launch_update_running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                                 const at::Tensor& mean, const at::Tensor& var, int64_t count,
                                 const at::Tensor& count_dev, c10::optional<double> momentum,
                                 const at::Tensor& tracked) {
  const int64_t C = mean.numel();
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(mean.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned blocks = static_cast<unsigned>((C + kUpdateThreads - 1) / kUpdateThreads);
  // The host's count gives the unbiasing factor here, in double, as the generic path computes it.
  const double host_unbias = count > 1 ? static_cast<double>(count) / static_cast<double>(count - 1) : 0.0;
  const double factor = momentum.value_or(0.0);
  const int64_t* tracked_p = tracked.defined() ? tracked.const_data_ptr<int64_t>() : nullptr;
  const double* count_p = count_dev.defined() ? count_dev.const_data_ptr<double>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "bn_cuda.update_running_stats", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_cuda.update_running_stats", [&] {
      using stat_t = scalar_t;
      update_running_stats_kernel<run_t, stat_t><<<blocks, kUpdateThreads, 0, stream>>>(
          running_mean.mutable_data_ptr<run_t>(), running_var.mutable_data_ptr<run_t>(),
          mean.const_data_ptr<stat_t>(), var.const_data_ptr<stat_t>(), C, static_cast<stat_t>(factor),
          static_cast<stat_t>(1.0 - factor), static_cast<stat_t>(host_unbias), tracked_p, count_p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace gpu
}  // namespace bn_cuda
