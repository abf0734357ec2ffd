#include "lowbit/core/threads.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <memory>
#include <mutex>
#include <set>
#include <thread>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LB_PAUSE() _mm_pause()
#else
#define LB_PAUSE() std::this_thread::yield()
#endif

// Symbols of OpenBLAS's DYNAMIC_ARCH builds; weak, so other OpenBLAS builds link and skip the fix.
extern "C" {
extern void* gotoblas __attribute__((weak));
void gotoblas_dynamic_init(void) __attribute__((weak));
}

namespace lowbit {

namespace {
int count_physical_cores() {
  // Distinct (package, core) pairs from sysfs; falls back to the logical CPU count.
  std::set<std::pair<std::string, std::string>> cores;
  const unsigned logical = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned c = 0; c < logical; ++c) {
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(c) + "/topology/";
    std::ifstream p(base + "physical_package_id"), k(base + "core_id");
    std::string ps, ks;
    if (!(p >> ps) || !(k >> ks)) return int(logical);
    cores.insert({ps, ks});
  }
  return cores.empty() ? int(logical) : int(cores.size());
}

std::string g_core_note;

void fix_openblas_core() {
  const char* name = openblas_get_corename();
  if (std::getenv("OPENBLAS_CORETYPE") || !name || std::strcmp(name, "Prescott") != 0) return;
  if (!&gotoblas || !gotoblas_dynamic_init) return;
  const char* pick = nullptr;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    pick = "SkylakeX";
  else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    pick = "Haswell";
  else if (__builtin_cpu_supports("avx"))
    pick = "Sandybridge";
#endif
  if (!pick) return;
  // OpenBLAS reads OPENBLAS_CORETYPE when it (re)initialises its kernel table; nothing has used
  // BLAS yet (init_threads runs before lowbit's first BLAS call).
  setenv("OPENBLAS_CORETYPE", pick, 0);
  gotoblas = nullptr;
  gotoblas_dynamic_init();
  g_core_note = std::string(" (OpenBLAS detected Prescott; lowbit selected ") + pick + ")";
}

thread_local bool t_in_parallel = false;  // this thread runs a pool task or a parallel call

// Workers wait for a new generation number; the caller runs tasks too and waits for them.
// One 64-bit word holds the run's generation (16 bits), its task count and the next unclaimed
// task (24 bits each): a task is claimed by a compare-and-swap that also checks the generation, so
// a worker that wakes late (descheduled on a loaded machine) can never run a task of a finished
// run, and the caller waits for the tasks to be done, not for every worker to check in: a worker
// that is asleep or preempted costs nothing, the caller and the others take its share. Small
// decode ops (about 200 parallel regions per token) depend on that.
class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      state_.store(pack(gen_of(state_.load()) + 1, 0, 0));
    }
    cv_work_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return int(workers_.size()) + 1; }

  // Runs task(ctx, t) for t in [0, tasks) on all threads; false when the pool is busy (the caller
  // then runs the work itself).
  bool run(int64_t tasks, void (*task)(void*, int64_t), void* ctx) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock()) return false;
    // More tasks than the 24-bit counter holds: each claim takes a run of consecutive indices.
    per_claim_ = (tasks + kMaxTasks - 1) / kMaxTasks;
    total_ = tasks;
    task_ = task;
    ctx_ = ctx;
    err_ = nullptr;
    const uint64_t claims = uint64_t((tasks + per_claim_ - 1) / per_claim_);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t gen = gen_of(state_.load(std::memory_order_relaxed)) + 1;
    {
      std::lock_guard<std::mutex> lk(mu_);
      state_.store(pack(gen, claims, 0), std::memory_order_release);
    }
    if (sleeping_.load(std::memory_order_acquire) > 0) cv_work_.notify_all();
    t_in_parallel = true;
    work(gen & kGenMask);
    t_in_parallel = false;
    for (int i = 0; done_.load(std::memory_order_acquire) < claims; ++i) {
      if (i < kSpin) LB_PAUSE();
      else std::this_thread::yield();  // a worker holding a task was preempted: give it the core
    }
    if (err_) std::rethrow_exception(err_);
    return true;
  }

 private:
  static constexpr int kSpin = 1 << 11;  // pauses (~50-150 us) before sleeping
  static constexpr uint64_t kMaxTasks = (uint64_t(1) << 24) - 1, kGenMask = 0xffff;
  static uint64_t pack(uint64_t gen, uint64_t n, uint64_t next) { return ((gen & kGenMask) << 48) | (n << 24) | next; }
  static uint64_t gen_of(uint64_t v) { return v >> 48; }

  // Claims and runs tasks of generation `gen` until none is left.
  void work(uint64_t gen) {
    uint64_t v = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = v & kMaxTasks, n = (v >> 24) & kMaxTasks;
      if (gen_of(v) != gen || next >= n) return;
      if (!state_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      const int64_t b = int64_t(next) * per_claim_, e = std::min(total_, b + per_claim_);
      for (int64_t t = b; t < e; ++t) {
        try {
          task_(ctx_, t);
        } catch (...) {
          std::lock_guard<std::mutex> lk(err_mu_);
          if (!err_) err_ = std::current_exception();
        }
      }
      done_.fetch_add(1, std::memory_order_acq_rel);
      v = state_.load(std::memory_order_acquire);
    }
  }

  void worker() {
    t_in_parallel = true;
    uint64_t seen = 0;
    for (;;) {
      for (int i = 0; i < kSpin && gen_of(state_.load(std::memory_order_acquire)) == seen; ++i) LB_PAUSE();
      if (gen_of(state_.load(std::memory_order_acquire)) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1);
        cv_work_.wait(lk, [&] { return gen_of(state_.load()) != seen || stop_; });
        sleeping_.fetch_sub(1);
      }
      if (stop_) return;
      seen = gen_of(state_.load(std::memory_order_acquire));
      work(seen);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex run_mu_, mu_, err_mu_;
  std::condition_variable cv_work_;
  std::atomic<uint64_t> state_{0};
  std::atomic<uint64_t> done_{0};
  std::atomic<int> sleeping_{0};
  std::atomic<bool> stop_{false};
  void (*task_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t total_ = 0, per_claim_ = 1;
  std::exception_ptr err_;
};

std::mutex g_pool_mu;
Pool* g_pool = nullptr;  // reachable for the program's lifetime (workers are never torn down at exit)
std::atomic<int> g_threads{0};
std::once_flag g_init;

void make_pool(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  delete g_pool;
  g_pool = n > 1 ? new Pool(n) : nullptr;
  g_threads = n;
  omp_set_num_threads(n);
  openblas_set_num_threads(1);
}

bool run_on_pool(int64_t tasks, void (*task)(void*, int64_t), void* ctx) {
  if (t_in_parallel || tasks < 2 || omp_in_parallel()) return false;  // inside OpenMP threads: serial
  Pool* p = g_pool;
  return p && p->run(tasks, task, ctx);
}
}  // namespace

int default_num_threads() {
  static const int n = count_physical_cores();
  return n;
}

void init_threads() {
  std::call_once(g_init, [] {
    fix_openblas_core();
    make_pool(default_num_threads());
  });
}

void set_num_threads(int n) {
  init_threads();
  n = n > 0 ? n : default_num_threads();
  if (n != g_threads.load()) make_pool(n);
}

int num_threads() {
  init_threads();
  return g_threads.load();
}

std::string threads_summary() {
  init_threads();
  const char* name = openblas_get_corename();
  return std::to_string(num_threads()) + " threads, OpenBLAS core " + (name ? name : "?") + g_core_note;
}

void parallel_for_impl(int64_t n, int64_t grain, void (*call)(void*, int64_t, int64_t), void* ctx) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  const int64_t chunks = std::min<int64_t>(num_threads(), n / grain);
  struct Ctx {
    int64_t n, chunks;
    void (*call)(void*, int64_t, int64_t);
    void* ctx;
  } c{n, chunks, call, ctx};
  auto task = [](void* p, int64_t t) {
    auto* c = static_cast<Ctx*>(p);
    c->call(c->ctx, c->n * t / c->chunks, c->n * (t + 1) / c->chunks);
  };
  if (chunks >= 2 && run_on_pool(chunks, task, &c)) return;
  call(ctx, 0, n);
}

bool in_parallel_region() { return t_in_parallel || omp_in_parallel(); }

void parallel_each_impl(int64_t n, void (*call)(void*, int64_t), void* ctx) {
  if (n <= 0) return;
  if (num_threads() >= 2 && run_on_pool(n, call, ctx)) return;
  for (int64_t i = 0; i < n; ++i) call(ctx, i);
}

BlasThreadsGuard::BlasThreadsGuard() {
  if (t_in_parallel || omp_in_parallel()) return;
  const int n = num_threads();
  if (n > 1) {
    openblas_set_num_threads(n);
    active_ = true;
  }
}

BlasThreadsGuard::~BlasThreadsGuard() {
  if (active_) openblas_set_num_threads(1);
}

}  // namespace lowbit
