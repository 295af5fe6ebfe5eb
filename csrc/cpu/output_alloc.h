// Allocation of the large outputs of the CPU kernels (y, dx).
//
// A fresh tensor of many MB comes from mmap: its memory is untouched, and the kernel's first
// write to each 4 KiB page takes a page fault that zeroes the page. For a 100 MB output that is
// ~25,000 faults, which cost more than the kernel's own reads and writes (measured on a 2-core
// EPYC VM: filling a fresh 103 MB tensor 26-29 ms, the same fill into touched memory 3.5 ms).
// Advising the kernel to back the untouched range with transparent huge pages (madvise
// MADV_HUGEPAGE, before the first write) turns 512 faults into one: the fresh fill drops to
// ~6.7 ms. PyTorch does the same for all its CPU allocations under THP_MEM_ALLOC_ENABLE=1; here
// it applies only to our own outputs of at least kHugePageMinBytes.
//
// The advice is only advice: where THP is off ("never"), on other systems, or when madvise fails,
// the tensor is the same and nothing else changes. BN_CUDA_CPU_HUGE_PAGES=0 turns it off.
#pragma once

#include <ATen/ATen.h>

#include "op_checks.h"

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace bn_cuda {

constexpr int64_t kHugePageBytes = int64_t(1) << 21;
// Below this, the 2 MiB-aligned interior of an allocation is at most one huge page.
constexpr int64_t kHugePageMinBytes = 4 * kHugePageBytes;

inline bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("BN_CUDA_CPU_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// Advises huge pages for the whole 2 MiB pages inside t's storage (t fresh from at::empty).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  if (bytes < kHugePageMinBytes || !t.is_cpu() || !huge_page_advice_enabled()) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t mask = static_cast<uintptr_t>(kHugePageBytes) - 1;
  const uintptr_t begin = (start + mask) & ~mask;
  const uintptr_t end = (start + static_cast<uintptr_t>(bytes)) & ~mask;
  if (end > begin) {
    // Failure (EINVAL without THP support) leaves ordinary pages: nothing to report.
    (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#else
  (void)t;
#endif
}

// empty_like_view (the view's dense output), large ones advised to use huge pages.
inline at::Tensor empty_output(const ChannelView& v) {
  at::Tensor out = empty_like_view(v);
  advise_huge_pages(out);
  return out;
}

}  // namespace bn_cuda
