// Warp, block and block-column reductions of per-channel partial results, in a fixed order.
//
// Every reduction here combines values in an order that depends only on thread indices, never on
// timing, and uses no atomics, so results are bitwise identical from run to run. The value types
// are WelfordState (statistics, merged with Chan's formula from welford.h) and SumPair (the two
// gradient sums of the backward pass). A reduction is called by every thread of the block (they
// contain __syncthreads) and returns the result in one thread, named in each contract.
#pragma once

#include <cuda_runtime.h>

#include "welford.h"

namespace bn_cuda {
namespace gpu {

constexpr int kWarpSize = 32;

// Two running sums reduced together: (sum dy, sum dy * (x - mean)) in the backward pass.
template <typename acc_t>
struct SumPair {
  acc_t first = acc_t(0);
  acc_t second = acc_t(0);
};

template <typename acc_t>
__device__ inline SumPair<acc_t> combine(const SumPair<acc_t>& a, const SumPair<acc_t>& b) {
  SumPair<acc_t> out;
  out.first = a.first + b.first;
  out.second = a.second + b.second;
  return out;
}

template <typename acc_t>
__device__ inline WelfordState<acc_t> combine(const WelfordState<acc_t>& a, const WelfordState<acc_t>& b) {
  return welford_merge(a, b);
}

template <typename acc_t>
__device__ inline SumPair<acc_t> shfl_down(const SumPair<acc_t>& v, int delta) {
  SumPair<acc_t> out;
  out.first = __shfl_down_sync(0xffffffffu, v.first, delta);
  out.second = __shfl_down_sync(0xffffffffu, v.second, delta);
  return out;
}

template <typename acc_t>
__device__ inline WelfordState<acc_t> shfl_down(const WelfordState<acc_t>& v, int delta) {
  WelfordState<acc_t> out;
  out.mean = __shfl_down_sync(0xffffffffu, v.mean, delta);
  out.m2 = __shfl_down_sync(0xffffffffu, v.m2, delta);
  // The count is an int64_t; CUDA has shuffles for long long, not for every 64-bit alias.
  out.count = static_cast<int64_t>(__shfl_down_sync(0xffffffffu, static_cast<long long>(v.count), delta));
  return out;
}

// Reduces v over the 32 lanes of a full warp (all lanes must call it). Lane 0 returns the result;
// other lanes return partial values. Tree order: lane i takes lane i + 16, then i + 8, ...
template <typename T>
__device__ inline T warp_reduce(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    v = combine(v, shfl_down(v, offset));
  }
  return v;
}

// Uninitialised shared-memory room for N values of T. (A __shared__ variable cannot have a
// constructor, and WelfordState / SumPair have default member initialisers.)
template <typename T, int N>
struct SharedArray {
  alignas(T) unsigned char bytes[N * sizeof(T)];
  __device__ T* data() { return reinterpret_cast<T*>(bytes); }
};

// Reduces v over a block whose size is a multiple of 32 (at most 1024 threads); every thread
// calls it. `slots` is shared memory for 32 values. Thread 0 (linear index) returns the result.
// Safe to call repeatedly with the same slots: it synchronizes before reusing them.
template <typename T>
__device__ inline T block_reduce(T v, T* slots) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  const int num_warps = (blockDim.x * blockDim.y) / kWarpSize;
  v = warp_reduce(v);
  __syncthreads();  // a previous call may still be reading the slots
  if (lane == 0) {
    slots[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    v = lane < num_warps ? slots[lane] : T{};
    v = warp_reduce(v);
  }
  return v;
}

// Reduces v over threadIdx.y for each threadIdx.x of a (blockDim.x, blockDim.y) block, with
// blockDim.y a power of two; every thread calls it. `slots` is shared memory for
// blockDim.x * blockDim.y values. Threads with threadIdx.y == 0 return their column's result.
// Safe to call repeatedly with the same slots. Used by the channels-last kernels, where a column
// of threads reads one channel's values from different rows.
template <typename T>
__device__ inline T column_reduce(T v, T* slots) {
  const int x = threadIdx.x;
  const int y = threadIdx.y;
  const int width = blockDim.x;
  __syncthreads();  // a previous call may still be reading the slots
  slots[y * width + x] = v;
  __syncthreads();
  // Rows [0, s) fold in rows [s, 2s): the reads and writes of one step touch disjoint rows.
  for (int s = blockDim.y / 2; s > 0; s >>= 1) {
    if (y < s) {
      v = combine(v, slots[(y + s) * width + x]);
      slots[y * width + x] = v;
    }
    __syncthreads();
  }
  return v;
}

}  // namespace gpu
}  // namespace bn_cuda
