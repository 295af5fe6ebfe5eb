// Autograd of the two forward ops that modules and bn_cuda.functional call: forward_train and
// forward_eval (the other differentiable ops, stats and normalize, have theirs in bn_cuda/ops.py).
//
// In C++ because these run on every batch-norm call: a Python autograd formula (an
// autograd.Function per call, its backward in Python) costs ~15 us per forward and ~25 us per
// backward of interpreter time with warm caches, and several times that right after a layer has
// streamed megabytes through the caches (measured on the 2-core EPYC VM: a 6.4 MB float16
// forward, 690 us below autograd, took 990 us through the Python formula).
//
// First derivatives come from the fused backward op. A gradient of a gradient (backward with
// create_graph=True, gradient penalties, gradgradcheck) differentiates a composition of ATen ops
// instead (grads_by_reference), as the fused kernels give first derivatives only.
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "op_checks.h"

namespace bn_cuda {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ForwardTrainOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using BackwardOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

const c10::TypedOperatorHandle<ForwardTrainOut(const at::Tensor&, const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, double)>&
forward_train_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::forward_train", "")
                             .typed<ForwardTrainOut(const at::Tensor&, const std::optional<at::Tensor>&,
                                                    const std::optional<at::Tensor>&, double)>();
  return op;
}

const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                                          double)>&
forward_eval_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::forward_eval", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&,
                                               const std::optional<at::Tensor>&, double)>();
  return op;
}

const c10::TypedOperatorHandle<BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const at::Tensor&, const std::optional<at::Tensor>&, bool,
                                           std::array<bool, 3>)>&
backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("bn_cuda::backward", "")
                             .typed<BackwardOut(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const std::optional<at::Tensor>&, bool,
                                                std::array<bool, 3>)>();
  return op;
}

std::optional<at::Tensor> optional_of(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Batch norm as differentiable ATen ops in the accumulation dtype: batch statistics when
// `training`, else (running_mean, running_var).
at::Tensor batch_norm_reference(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                                double eps, bool training, const at::Tensor& running_mean,
                                const at::Tensor& running_var) {
  const auto acc = acc_type(input.scalar_type());
  const at::Tensor x = input.to(acc);
  std::vector<int64_t> shape(input.dim(), 1);
  shape[1] = input.size(1);
  at::Tensor mean, var;
  if (training) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
    std::tie(var, mean) = at::var_mean(x, dims, /*correction=*/0, /*keepdim=*/false);
  } else {
    mean = running_mean.to(acc);
    var = running_var.to(acc);
  }
  at::Tensor y = (x - mean.reshape(shape)) * at::rsqrt(var.reshape(shape) + eps);
  if (weight.defined()) y = y * weight.to(acc).reshape(shape);
  if (bias.defined()) y = y + bias.to(acc).reshape(shape);
  return y.to(input.scalar_type());
}

// Gradients of batch_norm_reference for (input, weight, bias) where `needs` says so, themselves
// differentiable (the graph is built: this runs under create_graph=True).
std::array<at::Tensor, 3> grads_by_reference(const at::Tensor& grad_output, const at::Tensor& input,
                                             const at::Tensor& weight, const at::Tensor& bias, double eps,
                                             bool training, const at::Tensor& running_mean,
                                             const at::Tensor& running_var, std::array<bool, 3> needs) {
  const std::array<at::Tensor, 3> args{input, weight, bias};
  variable_list wanted;
  std::vector<int> slot;
  for (int i = 0; i < 3; ++i) {
    if (needs[i] && args[i].defined()) {
      wanted.push_back(args[i]);
      slot.push_back(i);
    }
  }
  std::array<at::Tensor, 3> out;
  if (wanted.empty()) return out;
  const at::Tensor y = batch_norm_reference(input, weight, bias, eps, training, running_mean, running_var);
  const variable_list grads = torch::autograd::grad({y}, wanted, {grad_output}, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
  for (size_t j = 0; j < slot.size(); ++j) out[slot[j]] = grads[j];
  return out;
}

// Saves what input_and_param_grads needs: (input, weight, bias, a, b), eps, and which of weight
// and bias were given. (a, b) are (mean, invstd) for forward_train, (running_mean, running_var)
// for forward_eval.
void save_for_grads(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                    const std::optional<at::Tensor>& bias, const at::Tensor& a, const at::Tensor& b, double eps) {
  ctx->set_materialize_grads(false);
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["has_weight"] = weight.has_value() && weight->defined();
  ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
  ctx->save_for_backward({input, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), a, b});
}

// Gradients for (input, weight, bias), each undefined where not needed: from the fused backward
// op, or differentiable ones from batch_norm_reference under create_graph. weight_edge is the
// autograd edge of weight (forward_train: 1; forward_eval: 3, after the running statistics);
// needs_input_grad counts only the tensors that were given, so bias's edge shifts past an absent
// weight.
std::array<at::Tensor, 3> input_and_param_grads(AutogradContext* ctx, const at::Tensor& grad_output, bool training,
                                                size_t weight_edge) {
  if (!grad_output.defined()) return {};
  const variable_list saved = ctx->get_saved_variables();
  const at::Tensor &input = saved[0], &weight = saved[1], &bias = saved[2], &a = saved[3], &b = saved[4];
  const bool has_weight = ctx->saved_data["has_weight"].toBool();
  const bool has_bias = ctx->saved_data["has_bias"].toBool();
  const std::array<bool, 3> needs{ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(weight_edge),
                                  has_bias && ctx->needs_input_grad(weight_edge + (has_weight ? 1 : 0))};
  const double eps = ctx->saved_data["eps"].toDouble();
  if (at::GradMode::is_enabled()) {
    return grads_by_reference(grad_output, input, weight, bias, eps, training, a, b, needs);
  }
  const at::Tensor invstd = training ? b : at::rsqrt(b.to(acc_type(input.scalar_type())) + eps);
  BackwardOut grads;
  {
    // Grad mode is off here: straight to the kernel, past the autograd fallback of an op that
    // has no derivative of its own (it checks every argument for requires_grad on each call).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    grads = backward_op().call(grad_output, input, a, invstd, optional_of(weight), training, needs);
  }
  auto& [grad_input, grad_weight, grad_bias] = grads;
  // The op returns (0,) placeholders for the outputs it was not asked for.
  return {needs[0] ? grad_input : at::Tensor(), needs[1] ? grad_weight : at::Tensor(),
          needs[2] ? grad_bias : at::Tensor()};
}

// forward_train: gradients for input, weight and bias; mean, invstd and var are not
// differentiable outputs (as PyTorch's native_batch_norm's saved statistics).
struct ForwardTrainFunction : public torch::autograd::Function<ForwardTrainFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    ForwardTrainOut out;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out = forward_train_op().call(input, weight, bias, eps);
    }
    auto& [y, mean, invstd, var] = out;
    save_for_grads(ctx, input, weight, bias, mean, invstd, eps);
    ctx->mark_non_differentiable({mean, invstd, var});
    return {y, mean, invstd, var};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto g = input_and_param_grads(ctx, grads[0], /*training=*/true, /*weight_edge=*/1);
    // Forward arguments: (input, weight, bias, eps).
    return {g[0], g[1], g[2], at::Tensor()};
  }
};

// forward_eval: gradients for input, weight and bias; the running statistics are not
// differentiable (a gradient asked for them raises, as PyTorch's batch norm does).
struct ForwardEvalFunction : public torch::autograd::Function<ForwardEvalFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& running_mean,
                               const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                               const std::optional<at::Tensor>& bias, double eps) {
    at::Tensor y;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      y = forward_eval_op().call(input, running_mean, running_var, weight, bias, eps);
    }
    save_for_grads(ctx, input, weight, bias, running_mean, running_var, eps);
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!ctx->needs_input_grad(1) && !ctx->needs_input_grad(2),
                "bn_cuda.forward_eval is not differentiable with respect to the running statistics");
    const auto g = input_and_param_grads(ctx, grads[0], /*training=*/false, /*weight_edge=*/3);
    // Forward arguments: (input, running_mean, running_var, weight, bias, eps).
    return {g[0], at::Tensor(), at::Tensor(), g[1], g[2], at::Tensor()};
  }
};

ForwardTrainOut forward_train_autograd(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double eps) {
  const variable_list out = ForwardTrainFunction::apply(input, weight, bias, eps);
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor forward_eval_autograd(const at::Tensor& input, const at::Tensor& running_mean,
                                 const at::Tensor& running_var, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  return ForwardEvalFunction::apply(input, running_mean, running_var, weight, bias, eps)[0];
}

}  // namespace
}  // namespace bn_cuda

TORCH_LIBRARY_IMPL(bn_cuda, Autograd, m) {
  m.impl("forward_train", &bn_cuda::forward_train_autograd);
  m.impl("forward_eval", &bn_cuda::forward_eval_autograd);
}
