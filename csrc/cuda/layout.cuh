// How the kernels walk the (N, C, L) view of op_checks.h in memory: vector packs, the walk over
// one channel of an NCHW tensor, the rows of a channels-last tensor, and the index type.
//
// Two memory orders (ChannelView::channels_last):
//   NCHW:  (N, C, L), L innermost. A channel is N planes of L contiguous values, C * L apart.
//   rows:  (N * L rows, C columns), C innermost (channels_last, and every input with L == 1).
// Kernels move V values per access: V = 16 bytes / sizeof(scalar_t) when every pointer is
// 16-byte aligned and the innermost extent (L for NCHW, C for rows) is a multiple of V, so that
// every vector lies inside one plane (NCHW) or one row (rows) and is aligned; V = 1 otherwise.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

namespace bn_cuda {
namespace gpu {

// Every kernel here runs blocks of at most this many threads (its __launch_bounds__).
constexpr int kMaxThreads = 256;

// V values of scalar_t moved as one memory access (one 16-byte load or store when vectorized).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Pack {
  scalar_t v[V];
};

// base[i] as a pack: i counts packs, not scalars.
template <int V, typename scalar_t, typename index_t>
__device__ inline Pack<scalar_t, V> load_pack(const scalar_t* __restrict__ base, index_t i) {
  return reinterpret_cast<const Pack<scalar_t, V>*>(base)[i];
}

template <int V, typename scalar_t, typename index_t>
__device__ inline void store_pack(scalar_t* __restrict__ base, index_t i, const Pack<scalar_t, V>& p) {
  reinterpret_cast<Pack<scalar_t, V>*>(base)[i] = p;
}

// Packs one thread loads before using any of them, so that several independent loads are in
// flight per thread (DRAM latency is hidden by bytes in flight, not by threads alone), while the
// values still fit in registers: 4 x 16 bytes vectorized, 8 scalars otherwise (NCHW); 8 rows
// (rows kernels). A chunk is also the unit of the statistics' two-pass update (channel_reduce.cu),
// which costs two divisions per chunk and lane: 8 rows keep that under one per 4 values.
constexpr int nchw_chunk(int V) { return V == 1 ? 8 : 4; }
constexpr int rows_chunk(int) { return 8; }

// Walks the packs of one channel of an (N, C, Lv) array, Lv = packs per plane, for a thread of
// rank `rank` among `nthreads` threads that share the channel: the thread visits the channel's
// flat pack indices rank, rank + nthreads, ... in (n, l) order, and a cursor keeps n, l and the
// memory offset without dividing per step.
//
// index_t is unsigned (uint32_t when numel < 2^31, else uint64_t). A cursor's offset is only
// meaningful while n < N; past the end it may wrap around, which unsigned arithmetic defines, and
// it is never dereferenced. Every offset that is dereferenced is < numel / V.
template <typename index_t>
class PlaneWalk {
 public:
  struct Cursor {
    index_t n;
    index_t l;
    index_t offset;  // in packs: n * C * Lv + c * Lv + l
  };

  __device__ PlaneWalk(index_t C, index_t Lv, index_t rank, index_t nthreads)
      : Lv_(Lv),
        plane_stride_(C * Lv),
        n0_(rank / Lv),
        l0_(rank % Lv),
        step_n_(nthreads / Lv),
        step_l_(nthreads % Lv),
        step_offset_(step_n_ * plane_stride_ + step_l_),
        wrap_offset_(plane_stride_ - Lv) {}

  __device__ Cursor start(index_t c) const { return Cursor{n0_, l0_, n0_ * plane_stride_ + c * Lv_ + l0_}; }

  // Moves the cursor nthreads packs further along the channel.
  __device__ void advance(Cursor& p) const {
    p.n += step_n_;
    p.l += step_l_;
    p.offset += step_offset_;
    if (p.l >= Lv_) {  // step_l_ < Lv, so one wrap at most
      p.l -= Lv_;
      p.n += 1;
      p.offset += wrap_offset_;
    }
  }

 private:
  index_t Lv_;
  index_t plane_stride_;
  index_t n0_;
  index_t l0_;
  index_t step_n_;
  index_t step_l_;
  index_t step_offset_;
  index_t wrap_offset_;
};

// Calls f(index_t{}) with the narrowest unsigned index type for a tensor of numel elements:
// uint32_t below 2^31 elements, which leaves 2^31 of headroom for the strides that loop counters
// add past the end (a row or channel counter never wraps while it is still compared), else
// uint64_t. 32-bit index arithmetic is cheaper and needs fewer registers.
template <typename F>
inline void dispatch_index_type(int64_t numel, F&& f) {
  if (numel < (int64_t{1} << 31)) {
    f(uint32_t{0});
  } else {
    f(uint64_t{0});
  }
}

// Calls f(std::integral_constant<int, V>{}) with V = kVec when `vectorize`, else V = 1.
template <int kVec, typename F>
inline void dispatch_vector_width(bool vectorize, F&& f) {
  if (vectorize) {
    f(std::integral_constant<int, kVec>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// True for a null pointer (an absent input) or a 16-byte aligned one.
inline bool aligned16(const void* p) {
  return reinterpret_cast<std::uintptr_t>(p) % 16 == 0;
}

}  // namespace gpu
}  // namespace bn_cuda
