// update_running_stats: one device-generic implementation (ATen ops only, no host reads), so the
// momentum=None cumulative average runs on the tensors' device and under CUDA graphs and
// torch.compile. Registered for CPU here and for CUDA when the CUDA backend is built.
#include <torch/library.h>

#include "op_checks.h"

namespace bn_cuda {
namespace {

void check_running(const at::Tensor& t, const char* name, const at::Tensor& stat) {
  TORCH_CHECK(t.defined(), "bn_cuda.update_running_stats: ", name, " is undefined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "bn_cuda.update_running_stats: ", name,
              " must be a floating point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == stat.numel(), "bn_cuda.update_running_stats: ", name, " should contain ",
              stat.numel(), " elements not ", t.numel());
  TORCH_CHECK(t.device() == stat.device(), "bn_cuda.update_running_stats: ", name, " is on ", t.device(),
              " but the batch statistics are on ", stat.device());
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
  if (!device_count) {
    TORCH_CHECK(count >= 0, "bn_cuda.update_running_stats: count must be non-negative, got ", count);
    TORCH_CHECK(count != 1, "bn_cuda.update_running_stats: the unbiased variance needs more than 1 value per "
                "channel, got count 1");
    if (count == 0) {
      return;  // an empty batch carries no statistics (PyTorch leaves the buffers unchanged too)
    }
  }
  const auto acc = mean.scalar_type();
  const at::Tensor batch_mean = mean.reshape(running_mean.sizes());
  at::Tensor batch_var;
  at::Tensor has_values;  // defined with count_tensor: whether there is anything to average in
  if (device_count) {
    TORCH_CHECK(count_tensor->numel() == 1 && count_tensor->device() == mean.device(),
                "bn_cuda.update_running_stats: count_tensor must be a one-element tensor on ", mean.device());
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
    TORCH_CHECK(tracked.numel() == 1 && tracked.device() == mean.device(),
                "bn_cuda.update_running_stats: num_batches_tracked must be a one-element tensor on ",
                mean.device());
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
