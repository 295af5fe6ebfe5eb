// The bn_cuda operator library: every schema, with its contract. Backends register kernels in
// csrc/cpu/batch_norm.cpp and csrc/cuda/batch_norm.cu; fake kernels live in bn_cuda/ops.py, autograd
// in csrc/autograd.cpp (forward_train, forward_eval) and bn_cuda/ops.py (stats, normalize).
//
// Shapes: `input` is (N, C, *) with any strides and at least 2 dims; statistics are per channel
// C, over the N * prod(*) values of each channel. Per-channel vectors (weight, bias, mean, invstd,
// running stats) hold C elements and sit on the input's device.
// Dtypes: input is float32, float64, float16 or bfloat16. "acc" below is float64 for float64
// input and float32 otherwise. Per-channel inputs may be any floating dtype (the Python layer
// enforces PyTorch's dtype rules); outputs that are per-channel statistics are acc.
// Layout: outputs shaped like input are dense in the input's memory format (NCHW input -> NCHW
// output, channels_last -> channels_last; view_format in op_checks.h says which for the
// ambiguous cases).
// Ops are functional except update_running_stats, whose schema declares what it mutates.
#include <Python.h>
#include <torch/library.h>

#include <cstdint>
#include <utility>

#include "cpu/output_alloc.h"

namespace bn_cuda {
// csrc/cpu/batch_norm.cpp
const char* cpu_isa_name();
// Sets the MiB from which the CPU kernels write both y and dx with non-temporal stores (as
// BN_CUDA_CPU_STREAM_MB does at the first call); mb < 0 restores their own bounds. Returns the
// previous setting (-1: none).
int64_t set_cpu_stream_mb(int64_t mb);
// (y, dx): the bytes from which each is streamed now.
std::pair<int64_t, int64_t> cpu_stream_bounds();
}  // namespace bn_cuda

namespace {

// cpu_isa() -> str: the instruction set the CPU kernels' loops run with ("x86-64-v3" or
// "baseline"; see csrc/cpu/vec_loops.h).
PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(bn_cuda::cpu_isa_name());
}

// cpu_cache_info() -> (cached_bytes, limit_bytes, hits, misses) of the CPU output cache
// (csrc/cpu/output_alloc.h).
PyObject* cpu_cache_info(PyObject*, PyObject*) {
  const bn_cuda::CpuCacheInfo info = bn_cuda::cpu_cache_info();
  return Py_BuildValue("(LLLL)", static_cast<long long>(info.cached_bytes), static_cast<long long>(info.limit_bytes),
                       static_cast<long long>(info.hits), static_cast<long long>(info.misses));
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  bn_cuda::empty_cpu_cache();
  Py_RETURN_NONE;
}

// set_cpu_stream_mb(mb: int) -> int: see bn_cuda::set_cpu_stream_mb (for bench/op_time.py).
PyObject* set_cpu_stream_mb(PyObject*, PyObject* arg) {
  const long long mb = PyLong_AsLongLong(arg);
  if (mb == -1 && PyErr_Occurred()) return nullptr;
  return PyLong_FromLongLong(static_cast<long long>(bn_cuda::set_cpu_stream_mb(mb)));
}

// cpu_stream_bounds() -> (y_bytes, dx_bytes).
PyObject* cpu_stream_bounds(PyObject*, PyObject*) {
  const auto [y, dx] = bn_cuda::cpu_stream_bounds();
  return Py_BuildValue("(LL)", static_cast<long long>(y), static_cast<long long>(dx));
}

PyMethodDef bn_cuda_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU kernels' loops."},
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS,
     "(cached_bytes, limit_bytes, hits, misses) of the CPU output cache."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Releases the CPU output cache's freed blocks."},
    {"set_cpu_stream_mb", set_cpu_stream_mb, METH_O,
     "Streams CPU outputs (y and dx) from this many MiB (< 0: their own bounds); returns the previous setting."},
    {"cpu_stream_bounds", cpu_stream_bounds, METH_NOARGS, "(y_bytes, dx_bytes) from which CPU outputs stream."},
    {nullptr, nullptr, 0, nullptr}};

// The Python module exists so that `import bn_cuda._C` loads this library and its
// registrations; the ops are reached through torch.ops.bn_cuda.
PyModuleDef bn_cuda_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, bn_cuda_methods};

}  // namespace

extern "C" PyObject* PyInit__C() {
  return PyModule_Create(&bn_cuda_module);
}

TORCH_LIBRARY(bn_cuda, m) {
  // Per-channel batch statistics. Returns (mean, var): float64 whatever the input dtype, shape
  // (C,); var is biased (divided by the count). For an empty input (count 0) both are 0.
  // float64 because these are what devices exchange and merge (Chan) in SyncBatchNorm: a
  // float32 mean near 1e4 is off by up to 5e-4, which swamps the between-chunk term of the merge.
  m.def("stats(Tensor input) -> (Tensor mean, Tensor var)");

  // y = (x - mean) * invstd * weight + bias, per channel; weight/bias default to 1/0.
  // Returns y in input's dtype and memory format.
  m.def("normalize(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> Tensor");

  // Training forward: batch statistics fused with normalize. Returns
  // (output, mean, invstd, var): output like input; mean, invstd = 1/sqrt(var + eps) and the
  // biased var in acc dtype, shape (C,). eps > 0.
  m.def(
      "forward_train(Tensor input, Tensor? weight, Tensor? bias, float eps) "
      "-> (Tensor output, Tensor mean, Tensor invstd, Tensor var)");

  // Eval forward from running statistics: y = (x - running_mean) / sqrt(running_var + eps)
  // * weight + bias. eps >= 0. Returns y like input.
  m.def(
      "forward_eval(Tensor input, Tensor running_mean, Tensor running_var, Tensor? weight, "
      "Tensor? bias, float eps) -> Tensor");

  // Backward reduction: per channel (sum dy, sum dy * (x - mean)), both acc dtype, shape (C,).
  m.def(
      "backward_reduce(Tensor grad_output, Tensor input, Tensor mean) "
      "-> (Tensor sum_dy, Tensor sum_dy_xmu)");

  // Backward elementwise for training statistics:
  // dx = (dy - mean_dy - (x - mean) * invstd^2 * mean_dy_xmu) * invstd * weight, where mean_dy
  // and mean_dy_xmu are the reductions above divided by the (possibly global) count.
  // Returns dx like input.
  m.def(
      "backward_elemt(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor mean_dy, Tensor mean_dy_xmu) -> Tensor");

  // Fused backward. With training=True, mean/invstd are the batch statistics of forward_train
  // and dx carries the terms through the statistics; with training=False they are the running
  // mean and 1/sqrt(running_var + eps) and dx = dy * invstd * weight.
  // Returns (grad_input, grad_weight, grad_bias): grad_input like input, grad_weight/grad_bias
  // shape (C,) in weight's dtype (acc when weight is None). An output whose output_mask entry is
  // false is not computed and is returned as an empty tensor of shape (0,).
  m.def(
      "backward(Tensor grad_output, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
      "bool training, bool[3] output_mask) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

  // Running statistics update, in place, no host synchronization:
  //   running_mean = (1 - f) * running_mean + f * mean
  //   running_var  = (1 - f) * running_var  + f * var * count / (count - 1)
  // with f = momentum, or f = 1 / num_batches_tracked when momentum is None (cumulative
  // average; num_batches_tracked is an integer tensor already counting this batch). mean/var are
  // the batch statistics of forward_train or stats (biased var); count is the number of values
  // per channel. count == 0 leaves the running statistics unchanged; count == 1 is an error.
  // count_tensor, when given, replaces count: a one-element tensor on the statistics' device
  // holding a count known only there (a process group's total after a collective); then the
  // count == 0 case is decided on the device and count == 1 makes running_var non-finite (NaN for
  // a single value's zero variance, as nn.SyncBatchNorm) instead of raising.
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, "
      "Tensor var, SymInt count, float? momentum, Tensor? num_batches_tracked, "
      "Tensor? count_tensor=None) -> ()");
}
