// Pin the calling thread's intra-op thread pool to CPUs: thread i of at::parallel_for (the caller is
// thread 0) to cpus[i % n]. torch's OpenMP pool belongs to the thread that opens the parallel region,
// so this runs on the thread that steps the model. Linux only (sched_setaffinity).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <vector>

#ifdef __linux__
#include <sched.h>
#endif

#include "kernels.h"

// Returns, per pool thread, the CPU it was pinned to, or -1 where that failed (or off Linux).
std::vector<int64_t> bind_threads(std::vector<int64_t> cpus) {
  TORCH_CHECK(!cpus.empty(), "bind_threads: no CPUs given");
  const int64_t n = at::get_num_threads();
  std::vector<int64_t> bound(n, -1);
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    if (tid >= n) return;
    const int64_t cpu = cpus[tid % cpus.size()];
#ifdef __linux__
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(static_cast<int>(cpu), &set);
    if (sched_setaffinity(0, sizeof(set), &set) == 0) bound[tid] = cpu;
#endif
  });
  return bound;
}
