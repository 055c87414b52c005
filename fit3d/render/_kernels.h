// Shared support of the CPU kernels: the thread pool every parallel loop runs on.
//
// Threads: `parallel_tasks` starts std::threads per call that take tasks from one atomic counter
// (the caller's thread is worker 0). It needs no OpenMP runtime, so the kernels run on all cores
// whatever runtime (libgomp, libiomp, libomp or none) torch links, and nothing is left behind to
// break a fork.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace fit3d {

// Runs fn(task, worker) for every task in [0, n_tasks) on up to n_threads threads; tasks are taken
// in order from one atomic counter, so callers put the expensive ones first. Worker ids are dense
// in [0, n_threads) (0 is the calling thread). If a thread cannot be started, fewer run.
template <typename Fn>
void parallel_tasks(int n_threads, int64_t n_tasks, Fn&& fn) {
  const int64_t want = std::min<int64_t>(std::max(n_threads, 1), n_tasks);
  std::atomic<int64_t> next{0};
  auto work = [&](int worker) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n_tasks;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i, worker);
  };
  std::vector<std::thread> pool;
  if (want > 1) pool.reserve(static_cast<size_t>(want - 1));
  for (int w = 1; w < want; ++w) {
    try {
      pool.emplace_back(work, w);
    } catch (const std::system_error&) {
      break;
    }
  }
  work(0);
  for (auto& t : pool) t.join();
}

}  // namespace fit3d
