// Allocation of the large outputs of the CPU kernels (y, dx): huge pages and a bounded cache.
//
// A fresh tensor of many MB comes from mmap: its memory is untouched, and the kernel's first
// write to each 4 KiB page takes a page fault that zeroes the page. For a 100 MB output that is
// ~25,000 faults, which cost more than the kernel's own reads and writes (measured on a 2-core
// EPYC VM: filling a fresh 103 MB tensor 26-29 ms, the same fill into touched memory 3.5 ms).
// Two things remove that cost:
//  - huge pages, for outputs of at least kLargeOutputBytes: the block is 2 MiB-aligned and
//    advised MADV_HUGEPAGE before its first write, which turns 512 faults into one (the fresh
//    fill: ~6.7 ms). BN_CUDA_CPU_HUGE_PAGES=0 turns the advice off; where THP is off or madvise
//    fails, nothing else changes.
//  - a cache of freed blocks, for outputs of at least kCachedOutputBytes, as PyTorch's CUDA
//    allocator keeps: a training step frees its outputs and the next step asks for the same
//    sizes, which then come back already mapped (no faults at all). Freed blocks are kept up to
//    BN_CUDA_CPU_CACHE_MB MiB in total (default 1024; 0 keeps none), the oldest released first;
//    bn_cuda.empty_cpu_cache() releases them all, and a failed allocation releases them and tries
//    again. A forked child starts with an empty cache.
// Smaller outputs come from PyTorch's CPU allocator. glibc's heap does not keep outputs of a few
// MiB either: a backward's dx of 3.2 MB came back as fresh pages on most calls (page faults were
// ~8% of a 32x512x7x7 training step), and from the cache the step took ~0.9x the time.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "op_checks.h"

namespace bn_cuda {

constexpr int64_t kPageBytes = int64_t(1) << 12;
constexpr int64_t kHugePageBytes = int64_t(1) << 21;
// Below this, the 2 MiB-aligned interior of an allocation is at most one huge page.
constexpr int64_t kLargeOutputBytes = 4 * kHugePageBytes;
// Outputs from this size on come from the cache of freed blocks.
constexpr int64_t kCachedOutputBytes = int64_t(1) << 20;

// An uninitialised tensor like empty_like_view(v) (the view's dense output); large ones from the
// cache described above. Its storage stays resizable.
at::Tensor empty_output(const ChannelView& v);

struct CpuCacheInfo {
  int64_t cached_bytes;  // freed blocks held now
  int64_t limit_bytes;   // BN_CUDA_CPU_CACHE_MB
  int64_t hits;          // large allocations served from the cache
  int64_t misses;        // large allocations that needed fresh memory
};

CpuCacheInfo cpu_cache_info();

// Releases every cached block to the system.
void empty_cpu_cache();

}  // namespace bn_cuda
