// Items handed out to the threads one at a time (shared by ssa.cpp and token_attention.cpp).
// at::parallel_for splits a range evenly between the threads up front, so one thread slowed by
// another process (2 cores, shared) holds the whole op back; here the threads take the next item
// from a shared counter, and a slowed thread takes fewer. Each item is computed the same way by
// whichever thread takes it, so results do not depend on the thread count.
#pragma once
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace spikeops {
namespace cpu {

// Calls f(state, item, next) for item = 0..n-1, with state = make_state() once per thread and
// next = the item that thread takes after this one, or -1 (for prefetching).
template <typename MakeState, typename F>
void for_each_item(int64_t n, const MakeState& make_state, const F& f) {
  std::atomic<int64_t> counter{0};
  const int64_t threads = std::min<int64_t>(n, at::get_num_threads());
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    int64_t item = counter.fetch_add(1, std::memory_order_relaxed);
    while (item < n) {
      const int64_t next = counter.fetch_add(1, std::memory_order_relaxed);
      f(state, item, next < n ? next : -1);
      item = next;
    }
  });
}

}  // namespace cpu
}  // namespace spikeops
