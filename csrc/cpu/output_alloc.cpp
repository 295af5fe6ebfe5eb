// The CPU output allocator and its cache of freed blocks (see output_alloc.h).
#include "cpu/output_alloc.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace bn_cuda {
namespace {

constexpr int64_t kDefaultCacheMiB = 1024;

bool huge_page_advice_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("BN_CUDA_CPU_HUGE_PAGES");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

int64_t cache_limit_bytes() {
  static const int64_t limit = [] {
    const char* env = std::getenv("BN_CUDA_CPU_CACHE_MB");
    int64_t mib = kDefaultCacheMiB;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long parsed = std::strtoll(env, &end, 10);
      if (*end == '\0' && parsed >= 0) mib = parsed;  // anything else: the default
    }
    return mib * (int64_t(1) << 20);
  }();
  return limit;
}

// A 2 MiB-aligned block of whole huge pages; the DataPtr context of a large output.
struct Block {
  void* ptr;
  size_t bytes;
};

void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge_page_advice_enabled()) {
    // Failure (EINVAL without THP support) leaves ordinary pages: nothing to report.
    (void)madvise(ptr, bytes, MADV_HUGEPAGE);
  }
#else
  (void)ptr;
  (void)bytes;
#endif
}

// The page size of a block of `bytes`: huge pages from kLargeOutputBytes, 4 KiB pages below. A
// block's size is a whole number of them, and so is its alignment.
size_t page_unit(size_t bytes) {
  return static_cast<int64_t>(bytes) >= kLargeOutputBytes ? kHugePageBytes : kPageBytes;
}

class BlockCache;
BlockCache& block_cache();

// Freed blocks, most recently freed last. Never destroyed: outputs may be freed during exit,
// after static destructors have run.
class BlockCache {
 public:
  BlockCache() {
#if defined(__linux__)
    // A child forked while another thread held the lock (a DataLoader worker, say) would wait on
    // it forever, or find the list half-edited: the child starts with a fresh lock and an empty
    // cache. The parent's blocks are left alone there (its copies, never written, cost nothing).
    pthread_atfork(nullptr, nullptr, [] {
      BlockCache& cache = block_cache();
      new (&cache.mutex_) std::mutex();
      new (&cache.free_) std::vector<Block*>();
      cache.cached_bytes_ = 0;
    });
#endif
  }

  // A block of exactly `bytes` (block_bytes): a cached one, or fresh memory.
  Block* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
        if ((*it)->bytes == bytes) {
          Block* block = *it;
          free_.erase(std::next(it).base());
          cached_bytes_ -= static_cast<int64_t>(bytes);
          ++hits_;
          return block;
        }
      }
      ++misses_;
    }
    const size_t alignment = page_unit(bytes);
    const bool huge = alignment == static_cast<size_t>(kHugePageBytes);
    void* ptr = std::aligned_alloc(alignment, bytes);
    if (ptr == nullptr) {
      clear();  // the cached blocks may be what the system is missing
      ptr = std::aligned_alloc(alignment, bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, ptr != nullptr, "bn_cuda: CPU out of memory: tried to allocate ", bytes,
                     " bytes for an output");
    if (huge) advise_huge_pages(ptr, bytes);
    return new Block{ptr, bytes};
  }

  // Keeps a freed block, releasing the oldest ones beyond the limit.
  void give(Block* block) {
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const int64_t bytes = static_cast<int64_t>(block->bytes);
      const int64_t limit = cache_limit_bytes();
      if (bytes > limit) {
        released.push_back(block);
      } else {
        size_t oldest = 0;
        while (cached_bytes_ + bytes > limit) {
          cached_bytes_ -= static_cast<int64_t>(free_[oldest]->bytes);
          released.push_back(free_[oldest++]);
        }
        free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(oldest));
        free_.push_back(block);
        cached_bytes_ += bytes;
      }
    }
    release(released);
  }

  void clear() {
    std::vector<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released.swap(free_);
      cached_bytes_ = 0;
    }
    release(released);
  }

  CpuCacheInfo info() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {cached_bytes_, cache_limit_bytes(), hits_, misses_};
  }

 private:
  static void release(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      std::free(block->ptr);
      delete block;
    }
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  int64_t cached_bytes_ = 0;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

BlockCache& block_cache() {
  static BlockCache* cache = new BlockCache();
  return *cache;
}

void give_back(void* context) {
  block_cache().give(static_cast<Block*>(context));
}

// The size of the cached block for a request of n bytes: whole pages of page_unit(n).
size_t block_bytes(size_t n) {
  const size_t unit = page_unit(n);
  return (n + unit - 1) / unit * unit;
}

// Requests of kCachedOutputBytes and more from the block cache, the others from PyTorch's CPU
// allocator. Set as the outputs' storage allocator, so that a resize_ of an output still works.
struct OutputAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    if (static_cast<int64_t>(n) < kCachedOutputBytes) return c10::GetCPUAllocator()->allocate(n);
    Block* block = block_cache().take(block_bytes(n));
    return {block->ptr, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

OutputAllocator* output_allocator() {
  static OutputAllocator* allocator = new OutputAllocator();
  return allocator;
}

}  // namespace

at::Tensor empty_output(const ChannelView& v) {
  const int64_t bytes = v.x.numel() * static_cast<int64_t>(v.x.element_size());
  if (!v.x.is_cpu() || bytes < kCachedOutputBytes) return empty_like_view(v);
  return at::detail::empty_generic(v.x.sizes(), output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   v.x.scalar_type(), v.format);
}

CpuCacheInfo cpu_cache_info() {
  return block_cache().info();
}

void empty_cpu_cache() {
  block_cache().clear();
}

}  // namespace bn_cuda
