// update_running_stats: one device-generic implementation (ATen ops only, no host reads), so the
// momentum=None cumulative average runs on the tensors' device and under CUDA graphs and
// torch.compile; plain CPU tensors take a direct loop instead (update_on_host), plain CUDA
// tensors one fused kernel (update_on_cuda). Registered for CPU here and for CUDA when the CUDA
// backend is built.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "op_checks.h"
#ifdef BN_CUDA_WITH_CUDA
#include "cuda/launchers.h"
#endif

namespace bn_cuda {
namespace {

template <typename run_t, typename stat_t>
void blend_on_host(run_t* running_mean, run_t* running_var, const stat_t* mean, const stat_t* var, int64_t n,
                   double factor, double unbias) {
  for (int64_t c = 0; c < n; ++c) {
    const double m = static_cast<double>(running_mean[c]);
    const double v = static_cast<double>(running_var[c]);
    running_mean[c] = static_cast<run_t>(factor * static_cast<double>(mean[c]) + (1 - factor) * m);
    running_var[c] = static_cast<run_t>(factor * static_cast<double>(var[c]) * unbias + (1 - factor) * v);
  }
}

// The layout both direct paths take: contiguous buffers of one dtype, contiguous float or double
// statistics of one dtype (devices are checked to agree before either is tried).
bool plain_layout(const at::Tensor& running_mean, const at::Tensor& running_var, const at::Tensor& mean,
                  const at::Tensor& var) {
  return running_mean.is_contiguous() && running_var.is_contiguous() && mean.is_contiguous() &&
         var.is_contiguous() && running_mean.scalar_type() == running_var.scalar_type() &&
         mean.scalar_type() == var.scalar_type() &&
         (mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble);
}

// CPU tensors with a count known on the host: one loop over the channels in double, as PyTorch's
// CPU kernel does, instead of the ~10 small ATen ops of the generic path (~20 us per call, more
// than the kernels of a small layer). Returns false where the generic path is needed.
bool update_on_host(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                    const at::Tensor& var, int64_t count, c10::optional<double> momentum,
                    const c10::optional<at::Tensor>& num_batches_tracked) {
  if (!mean.is_cpu() || !plain_layout(running_mean, running_var, mean, var)) return false;
  double factor;
  if (momentum.has_value()) {
    factor = *momentum;
  } else {
    factor = 1.0 / num_batches_tracked->item<double>();  // on the CPU, as mean (checked)
  }
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const int64_t n = mean.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(), "update_running_stats", [&] {
    scalar_t* rm = running_mean.mutable_data_ptr<scalar_t>();
    scalar_t* rv = running_var.mutable_data_ptr<scalar_t>();
    if (mean.scalar_type() == at::kDouble) {
      blend_on_host(rm, rv, mean.const_data_ptr<double>(), var.const_data_ptr<double>(), n, factor, unbias);
    } else {
      blend_on_host(rm, rv, mean.const_data_ptr<float>(), var.const_data_ptr<float>(), n, factor, unbias);
    }
  });
  return true;
}

#ifdef BN_CUDA_WITH_CUDA
// CUDA tensors in the usual layout (plain_layout, buffers of a dtype the kernel takes, an int64
// counter): one kernel (cuda/running_stats.cu) instead of the generic path's ~10 launches.
// Returns false where the generic path is needed.
bool update_on_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean, const at::Tensor& var,
                    int64_t count, c10::optional<double> momentum,
                    const c10::optional<at::Tensor>& num_batches_tracked,
                    const c10::optional<at::Tensor>& count_tensor) {
  const auto buffers = running_mean.scalar_type();
  if (!mean.is_cuda() || !plain_layout(running_mean, running_var, mean, var) ||
      !(buffers == at::kFloat || buffers == at::kDouble || buffers == at::kHalf || buffers == at::kBFloat16)) {
    return false;
  }
  at::Tensor tracked;
  if (!momentum.has_value()) {
    tracked = *num_batches_tracked;
    if (tracked.scalar_type() != at::kLong) return false;
  }
  at::Tensor count_dev;
  if (count_tensor.has_value() && count_tensor->defined()) {
    count_dev = count_tensor->reshape({}).to(at::kDouble);
  }
  gpu::launch_update_running_stats(running_mean, running_var, mean, var, count, count_dev, momentum, tracked);
  return true;
}
#endif

void check_running(const at::Tensor& t, const char* name, const at::Tensor& stat) {
  TORCH_CHECK(t.defined(), "bn_cuda.update_running_stats: ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bn_cuda.update_running_stats: ", name,
              " must be a floating point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == stat.numel(), "bn_cuda.update_running_stats: ", name, " should contain ",
              stat.numel(), " elements not ", t.numel());
  TORCH_CHECK(t.device() == stat.device(), "bn_cuda.update_running_stats: ", name, " is on ", t.device(),
              " but the batch statistics are on ", stat.device());
}

// A count or counter tensor: one element, on the statistics' device.
void check_one_element(const at::Tensor& t, const char* name, const at::Tensor& stat) {
  TORCH_CHECK(t.numel() == 1 && t.device() == stat.device(), "bn_cuda.update_running_stats: ", name,
              " must be a one-element tensor on ", stat.device(), ", got ", t.numel(), " element(s) on device ",
              t.device());
}

void update_running_stats(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                          const at::Tensor& var, int64_t count, c10::optional<double> momentum,
                          const c10::optional<at::Tensor>& num_batches_tracked,
                          const c10::optional<at::Tensor>& count_tensor) {
  TORCH_CHECK(mean.defined() && var.defined(), "bn_cuda.update_running_stats: mean and var must be defined");
  TORCH_CHECK(mean.numel() == var.numel() && mean.device() == var.device(),
              "bn_cuda.update_running_stats: mean and var must have the same size and device");
  check_running(running_mean, "running_mean", mean);
  check_running(running_var, "running_var", mean);
  const bool cumulative = !momentum.has_value();
  TORCH_CHECK(!cumulative || (num_batches_tracked.has_value() && num_batches_tracked->defined()),
              "bn_cuda.update_running_stats: momentum=None needs num_batches_tracked");
  const bool device_count = count_tensor.has_value() && count_tensor->defined();
  if (device_count) {
    check_one_element(*count_tensor, "count_tensor", mean);
  } else {
    TORCH_CHECK(count >= 0, "bn_cuda.update_running_stats: count must be non-negative, got ", count);
    TORCH_CHECK(count != 1, "bn_cuda.update_running_stats: the unbiased variance needs more than 1 value per "
                "channel, got count 1");
    if (count == 0) {
      return;  // an empty batch carries no statistics (PyTorch leaves the buffers unchanged too)
    }
  }
  if (cumulative) {
    check_one_element(*num_batches_tracked, "num_batches_tracked", mean);
  }
  if (!device_count && update_on_host(running_mean, running_var, mean, var, count, momentum, num_batches_tracked)) {
    return;
  }
#ifdef BN_CUDA_WITH_CUDA
  if (update_on_cuda(running_mean, running_var, mean, var, count, momentum, num_batches_tracked, count_tensor)) {
    return;
  }
#endif
  const auto acc = mean.scalar_type();
  const at::Tensor batch_mean = mean.reshape(running_mean.sizes());
  at::Tensor batch_var;
  at::Tensor has_values;  // defined with count_tensor: whether there is anything to average in
  if (device_count) {
    // The count is known only on the device (a process group's total after a collective): the
    // unbiasing factor and the empty-batch skip are computed there. A count of 1 gives an
    // infinite factor (running_var becomes NaN for a single value's zero variance), as in
    // nn.SyncBatchNorm.
    const at::Tensor n = count_tensor->reshape({}).to(acc);
    batch_var = var.reshape(running_var.sizes()) * (n / (n - 1));
    has_values = n > 0;
  } else {
    batch_var = var.reshape(running_var.sizes()) * (static_cast<double>(count) / static_cast<double>(count - 1));
  }
  at::Tensor new_mean, new_var;
  if (cumulative) {
    const auto& tracked = *num_batches_tracked;
    const at::Tensor factor = tracked.reshape({}).to(acc).reciprocal();
    const at::Tensor keep = 1 - factor;
    new_mean = factor * batch_mean + keep * running_mean.to(acc);
    new_var = factor * batch_var + keep * running_var.to(acc);
  } else {
    const double factor = *momentum;
    new_mean = factor * batch_mean + (1 - factor) * running_mean.to(acc);
    new_var = factor * batch_var + (1 - factor) * running_var.to(acc);
  }
  if (has_values.defined()) {
    new_mean = at::where(has_values, new_mean, running_mean.to(acc));
    new_var = at::where(has_values, new_var, running_var.to(acc));
  }
  running_mean.copy_(new_mean);
  running_var.copy_(new_var);
}

}  // namespace
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, CPU, m) {
  m.impl("update_running_stats", &bn_cuda::update_running_stats);
}

#ifdef BN_CUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(bn_cuda, CUDA, m) {
  m.impl("update_running_stats", &bn_cuda::update_running_stats);
}
#endif
