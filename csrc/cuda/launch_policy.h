// Launch shapes (grid and block) for the two memory orders of layout.cuh. One policy, used by the
// reduction and the elementwise launchers, which differ only in how much work they want per
// thread and how many device-fills of blocks they aim for.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "layout.cuh"
#include "reduce.cuh"

namespace bn_cuda {
namespace gpu {

// The hardware limit of gridDim.y and gridDim.z. Kernels loop (grid-stride) past it.
constexpr int64_t kMaxGridY = 65535;

struct LaunchShape {
  dim3 grid;
  dim3 block;
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// Smallest power of two >= x, for 1 <= x <= kMaxThreads.
inline int next_pow2(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Blocks of `threads` threads that fill the current device once at full occupancy (ignoring
// registers). Cached device properties: no host synchronization.
inline int64_t blocks_per_wave(int threads) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int per_sm = std::min(prop->maxBlocksPerMultiProcessor, prop->maxThreadsPerMultiProcessor / threads);
  return static_cast<int64_t>(prop->multiProcessorCount) * std::max(1, per_sm);
}

// NCHW kernels: blockIdx.y walks the channels (grid-stride past 65535) and gridDim.x blocks split
// one channel's work, `chunks` thread-chunks (layout.cuh) per channel.
// - Block: as many threads as there are chunks, a power of two in [32, 256], so that channels of
//   a few values do not leave most lanes idle while large ones get full blocks.
// - Split: enough blocks per channel that each thread gets about `chunks_per_thread` chunks, but
//   no more than `waves` device-fills of blocks over all channels: with C >= the SM count every
//   channel gets one block; with C = 64 on 132 SMs each channel is shared by ~16 blocks, so the
//   whole GPU works (a reduction then merges the per-block partials in a second kernel).
inline LaunchShape nchw_shape(int64_t C, int64_t chunks, int64_t chunks_per_thread, int64_t waves) {
  const int threads = std::max(kWarpSize, next_pow2(std::min<int64_t>(chunks, kMaxThreads)));
  const int64_t wanted = ceil_div(chunks, threads * chunks_per_thread);
  const int64_t room = std::max<int64_t>(1, waves * blocks_per_wave(threads) / C);
  const int64_t split = std::max<int64_t>(1, std::min(wanted, room));
  return LaunchShape{dim3(static_cast<unsigned>(split), static_cast<unsigned>(std::min(C, kMaxGridY))),
                     dim3(static_cast<unsigned>(threads))};
}

// Rows kernels (channels-last): a (tx, ty) block, threadIdx.x along the Cv = C / V column packs
// (a warp reads consecutive 16-byte packs of a row, or several short rows back to back: coalesced)
// and threadIdx.y along rows; gridDim.x covers the columns, gridDim.y splits the rows.
// - Block: tx = Cv rounded up to a power of two, at most 32; ty = enough rows for the row chunks,
//   at most 256 / tx; leftover threads widen tx again (few rows, many channels: (3, 65537)).
//   Both are powers of two (column_reduce needs ty to be one).
// - Split: as in nchw_shape, each thread about `chunks_per_thread` chunks of `rows_per_chunk`
//   rows, at most `waves` device-fills of blocks, and at most 65535.
inline LaunchShape rows_shape(int64_t R, int64_t Cv, int rows_per_chunk, int64_t chunks_per_thread,
                              int64_t waves) {
  const int64_t row_chunks = ceil_div(R, rows_per_chunk);
  int tx = std::min(next_pow2(std::min<int64_t>(Cv, kMaxThreads)), kWarpSize);
  const int ty = std::min(kMaxThreads / tx, next_pow2(std::min<int64_t>(row_chunks, kMaxThreads)));
  tx = std::min(kMaxThreads / ty, next_pow2(std::min<int64_t>(Cv, kMaxThreads)));
  const int64_t column_blocks = ceil_div(Cv, tx);
  const int64_t wanted = ceil_div(row_chunks, ty * chunks_per_thread);
  const int64_t room = std::max<int64_t>(1, waves * blocks_per_wave(tx * ty) / column_blocks);
  const int64_t split = std::max<int64_t>(1, std::min({wanted, room, kMaxGridY}));
  return LaunchShape{dim3(static_cast<unsigned>(column_blocks), static_cast<unsigned>(split)),
                     dim3(static_cast<unsigned>(tx), static_cast<unsigned>(ty))};
}

}  // namespace gpu
}  // namespace bn_cuda
