// Welford / Chan statistics: the one copy of the math shared by the CPU and CUDA kernels.
//
// A WelfordState summarises a set of values by (count, mean, m2) where m2 = sum((x - mean)^2).
// Merging two states with Chan's formula gives the state of the union exactly (up to rounding),
// whatever the split, so partial results from threads, warps, blocks or chunks combine in any
// fixed order. The biased variance is m2 / count.
#pragma once

#include <c10/macros/Macros.h>
#include <cstdint>

namespace bn_cuda {

template <typename acc_t>
struct WelfordState {
  acc_t mean = acc_t(0);
  acc_t m2 = acc_t(0);
  int64_t count = 0;
};

// Adds one value. acc_t is the accumulation type (float for float/half/bfloat16, double for double).
template <typename acc_t>
C10_HOST_DEVICE inline void welford_add(WelfordState<acc_t>& s, acc_t x) {
  s.count += 1;
  const acc_t delta = x - s.mean;
  s.mean += delta / static_cast<acc_t>(s.count);
  s.m2 += delta * (x - s.mean);
}

// Chan's parallel merge: returns the state of the union of the sets that a and b summarise.
// Either side may be empty (count 0); the result does not depend on which one is.
template <typename acc_t>
C10_HOST_DEVICE inline WelfordState<acc_t> welford_merge(const WelfordState<acc_t>& a,
                                                         const WelfordState<acc_t>& b) {
  const int64_t count = a.count + b.count;
  if (count == 0) {
    return a;
  }
  const acc_t delta = b.mean - a.mean;
  const acc_t b_share = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  WelfordState<acc_t> out;
  out.count = count;
  out.mean = a.mean + delta * b_share;
  out.m2 = a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * b_share;
  return out;
}

// Biased variance m2 / count; 0 for an empty set (its statistics are never used: callers skip
// the running-stat update when count is 0).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t welford_variance(const WelfordState<acc_t>& s) {
  return s.count > 0 ? s.m2 / static_cast<acc_t>(s.count) : acc_t(0);
}

}  // namespace bn_cuda
