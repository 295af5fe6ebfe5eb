// Host-side argument checks and the (N, C, L) view shared by the CPU and CUDA backends.
// Every op validates its arguments here before any kernel runs, so a wrong call raises a
// RuntimeError a user can act on instead of reading or writing out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

namespace bn_cuda {

// Accumulation dtype: float64 for float64 input, float32 for float32 / float16 / bfloat16.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The input seen as (N, C, L), L = prod(spatial dims), dense in `format`.
// channels_last: memory order is (N*L rows, C columns), C innermost. Also chosen when L == 1,
// where both orders coincide and the row view keeps C contiguous.
struct ChannelView {
  at::Tensor x;
  at::MemoryFormat format;
  bool channels_last;
  int64_t N;
  int64_t C;
  int64_t L;
  int64_t count() const { return N * L; }  // values per channel
};

inline void check_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.defined(), "bn_cuda.", op, ": input is undefined");
  TORCH_CHECK(input.dim() >= 2, "bn_cuda.", op, ": expected input with at least 2 dims (N, C, ...), got ",
              input.dim(), "D input");
  TORCH_CHECK(input.size(1) > 0, "bn_cuda.", op, ": expected input with at least one channel, got size ",
              input.sizes());
  const auto t = input.scalar_type();
  TORCH_CHECK_NOT_IMPLEMENTED(
      t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
      "\"batch_norm\" not implemented for '", c10::toString(t), "'");
  TORCH_CHECK(input.layout() == at::kStrided, "bn_cuda.", op, ": expected a strided (dense) input, got ",
              input.layout());
}

// The memory format the kernels walk and write the outputs in (4D/5D input; else contiguous).
// CPU, as PyTorch's CPU batch norm: the format the input is dense in, contiguous first, then
// channels_last(_3d), else suggest_memory_format(). The two differ on channels_last inputs with
// odd strides on a size-1 dim (an HWC image permuted and unsqueezed to 1xCxHxW), which
// suggest_memory_format() calls contiguous. CUDA: suggest_memory_format(), as cuDNN's batch norm.
// An empty input, contiguous in every format and contiguous to suggest_memory_format(): channels
// last where its channels' stride is 1 (C > 1), as empty_like keeps it (nn.SyncBatchNorm's output
// on a rank with no samples). bn_cuda/ops.py's fake kernels follow the same rule.
inline at::MemoryFormat view_format(const at::Tensor& input) {
  if (!input.defined() || (input.dim() != 4 && input.dim() != 5)) return at::MemoryFormat::Contiguous;
  const auto channels_last = input.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  if (input.numel() == 0) {
    return input.size(1) > 1 && input.stride(1) == 1 ? channels_last : at::MemoryFormat::Contiguous;
  }
  if (input.is_cpu()) {
    if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
    if (input.is_contiguous(channels_last)) return channels_last;
  }
  return input.suggest_memory_format();
}

// The memory format of grad_input, as PyTorch's CPU backward picks it: view_format(input) where
// input and grad_output are both dense and suggest_memory_format() names the same format for
// both, else input.suggest_memory_format(). The two differ only for the odd-strided inputs of
// view_format, whose grad_input PyTorch writes contiguous unless grad_output has such strides
// too. CUDA: view_format(input).
inline at::MemoryFormat grad_input_format(const at::Tensor& input, const at::Tensor& grad_output) {
  const at::MemoryFormat format = view_format(input);
  if (!input.defined() || !input.is_cpu() || !grad_output.defined() || format == input.suggest_memory_format()) {
    return format;
  }
  const bool dense = grad_output.is_contiguous() || grad_output.is_contiguous(format);
  return dense && grad_output.suggest_memory_format() == input.suggest_memory_format()
             ? format
             : input.suggest_memory_format();
}

// The input as (N, C, L) in `format` (a copy where it is not dense in it).
inline ChannelView channel_view(const at::Tensor& input, const char* op, at::MemoryFormat format) {
  check_input(input, op);
  ChannelView v;
  v.format = input.dim() == 4 || input.dim() == 5 ? format : at::MemoryFormat::Contiguous;
  v.x = input.contiguous(v.format);
  v.N = input.size(0);
  v.C = input.size(1);
  v.L = 1;
  for (int64_t d = 2; d < input.dim(); ++d) v.L *= input.size(d);
  v.channels_last = v.format != at::MemoryFormat::Contiguous || v.L == 1;
  return v;
}

inline ChannelView channel_view(const at::Tensor& input, const char* op) {
  return channel_view(input, op, view_format(input));
}

// An uninitialised tensor shaped like the input, dense in the view's memory format.
inline at::Tensor empty_like_view(const ChannelView& v) {
  return at::empty(v.x.sizes(), v.x.options().memory_format(v.format));
}

// grad_output checked against the input and made dense in the input's memory format, so both
// are walked in the same order.
inline at::Tensor grad_like_view(const at::Tensor& grad_output, const ChannelView& v, const char* op) {
  TORCH_CHECK(grad_output.defined(), "bn_cuda.", op, ": grad_output is undefined");
  TORCH_CHECK(grad_output.sizes() == v.x.sizes(), "bn_cuda.", op, ": grad_output has size ",
              grad_output.sizes(), " but input has size ", v.x.sizes());
  TORCH_CHECK(grad_output.scalar_type() == v.x.scalar_type(), "bn_cuda.", op, ": grad_output has dtype ",
              grad_output.scalar_type(), " but input has dtype ", v.x.scalar_type());
  TORCH_CHECK(grad_output.device() == v.x.device(), "bn_cuda.", op, ": grad_output is on ",
              grad_output.device(), " but input is on ", v.x.device());
  return grad_output.contiguous(v.format);
}

// A per-channel vector argument, checked (C elements, floating, input's device) and returned as a
// contiguous (C,) tensor in acc dtype. An absent optional one is filled with `fill`.
inline at::Tensor channel_vector(const c10::optional<at::Tensor>& t, const char* name, const ChannelView& v,
                                 double fill, const char* op) {
  const auto acc = acc_type(v.x.scalar_type());
  if (!t.has_value() || !t->defined()) {
    return at::full({v.C}, fill, v.x.options().dtype(acc));
  }
  TORCH_CHECK(t->numel() == v.C, "bn_cuda.", op, ": ", name, " should contain ", v.C, " elements not ",
              t->numel());
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "bn_cuda.", op, ": ", name,
              " must be a floating point tensor, got ", t->scalar_type());
  TORCH_CHECK(t->device() == v.x.device(), "bn_cuda.", op, ": ", name, " is on ", t->device(),
              " but input is on ", v.x.device());
  return t->reshape({v.C}).to(acc).contiguous();
}

inline at::Tensor channel_vector(const at::Tensor& t, const char* name, const ChannelView& v, const char* op) {
  TORCH_CHECK(t.defined(), "bn_cuda.", op, ": ", name, " is undefined");
  return channel_vector(c10::optional<at::Tensor>(t), name, v, 0.0, op);
}

// A NaN eps passes, as in PyTorch (its checks are the same comparisons): every output is NaN.
inline void check_eps(double eps, bool training, const char* op) {
  if (training) {
    TORCH_CHECK(!(eps <= 0), "bn_cuda.", op, ": eps must be positive during training, got ", eps);
  } else {
    TORCH_CHECK(!(eps < 0), "bn_cuda.", op, ": eps must be non-negative, got ", eps);
  }
}

// Empty (0,) placeholder for an output that output_mask says is not wanted.
inline at::Tensor not_computed(const at::TensorOptions& options) {
  return at::empty({0}, options);
}

}  // namespace bn_cuda
