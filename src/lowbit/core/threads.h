// One thread pool for the whole program: lowbit's own (num_threads() - 1 workers plus the calling
// thread). Every parallel loop of the model's data path (ops, and the matrix products, which split
// their output over the pool and call single-threaded BLAS per piece: core/blas.h) runs on it, so
// OpenBLAS's own threads, OpenMP's and ours never compete for the same cores. Idle workers spin
// for a few microseconds, then sleep on a condition variable: OpenMP's and OpenBLAS's long
// spin-waits made a 2-core forward spend a third to half of its CPU time spinning. OpenBLAS is
// kept at 1 thread, except inside a BlasThreadsGuard (for the few LAPACK-like calls, e.g. GPTQ's
// syrk/trsm, that have no split of their own); OpenMP (still used by a few quantization loops) is
// given the same thread count.
//
// The first use also repairs OpenBLAS's CPU detection where it fell back to its slowest kernels:
// Debian's OpenBLAS 0.3.21 (DYNAMIC_ARCH) does not know newer Xeons and picks "Prescott" (SSE3),
// about 4.5x slower than its SkylakeX kernels on the same AVX-512 CPU. When OPENBLAS_CORETYPE is
// unset and the detected core is Prescott, lowbit selects SkylakeX / Haswell / Sandybridge by
// the CPU's features (OpenBLAS's exported gotoblas_dynamic_init; nothing happens with other
// builds of OpenBLAS).
#pragma once
#include <cstdint>
#include <string>

namespace lowbit {

// Threads for lowbit's parallel work. n <= 0 selects the default, the number of physical cores.
// Not to be called while parallel work is running.
void set_num_threads(int n);
int num_threads();
int default_num_threads();  // physical cores (hyper-threads share a core's vector units)
// One line for logs: threads, OpenBLAS core (and whether lowbit re-selected it).
std::string threads_summary();
// Called once before the first BLAS use (idempotent, thread-safe); set_num_threads calls it.
void init_threads();
// Whether this thread runs inside a parallel region (a pool task or a parallel call), where the
// parallel loops below run serially.
bool in_parallel_region();

// Runs fn(begin, end) over consecutive chunks of [0, n) on the pool, at least `grain` indices a
// chunk; serially (one call fn(0, n)) when n < 2 * grain, one thread is set, or already inside a
// parallel region (a pool task, or another thread's parallel call). Exceptions thrown by fn are rethrown on the calling
// thread.
void parallel_for_impl(int64_t n, int64_t grain, void (*call)(void*, int64_t, int64_t), void* ctx);
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& fn) {
  auto tramp = [](void* c, int64_t b, int64_t e) { (*static_cast<F*>(c))(b, e); };
  parallel_for_impl(n, grain, tramp, static_cast<void*>(&fn));
}

// Runs fn(i) for every i in [0, n), indices handed out one at a time (for items of unequal cost,
// e.g. causal attention tiles); serially when one thread is set or inside a parallel region.
void parallel_each_impl(int64_t n, void (*call)(void*, int64_t), void* ctx);
template <class F>
void parallel_each(int64_t n, F&& fn) {
  auto tramp = [](void* c, int64_t i) { (*static_cast<F*>(c))(i); };
  parallel_each_impl(n, tramp, static_cast<void*>(&fn));
}

// Sum of fn(begin, end) (a double) over chunks of [0, n) as parallel_for splits it; the partial
// sums are added in chunk order, so the result does not depend on thread timing.
template <class F>
double parallel_sum(int64_t n, int64_t grain, F&& fn) {
  if (n <= 0) return 0.0;
  if (grain < 1) grain = 1;
  int64_t chunks = n / grain < num_threads() ? n / grain : num_threads();
  if (chunks < 2) return fn(int64_t(0), n);
  double part[64] = {};
  if (chunks > 64) chunks = 64;
  parallel_each(chunks, [&](int64_t c) { part[c] = fn(n * c / chunks, n * (c + 1) / chunks); });
  double s = 0;
  for (int64_t c = 0; c < chunks; ++c) s += part[c];
  return s;
}

// Lets OpenBLAS use num_threads() threads in its own calls for the guard's lifetime (outside
// OpenMP regions only).
class BlasThreadsGuard {
 public:
  BlasThreadsGuard();
  ~BlasThreadsGuard();
  BlasThreadsGuard(const BlasThreadsGuard&) = delete;
  BlasThreadsGuard& operator=(const BlasThreadsGuard&) = delete;

 private:
  bool active_ = false;
};

}  // namespace lowbit
