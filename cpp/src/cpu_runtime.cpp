#include "zeroshard/cpu_runtime.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "simd/kernel_table.hpp"
#include "zeroshard/error.hpp"

namespace zeroshard::cpu {
namespace {

bool cpu_has(SimdLevel level) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // Exactly the instruction sets kernels_avx512.cpp / kernels_avx2.cpp are compiled for.
  if (level == SimdLevel::avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  if (level == SimdLevel::avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return level == SimdLevel::scalar;
}

bool build_has(SimdLevel level) {
  if (level == SimdLevel::avx512) return avx512_kernels() != nullptr;
  if (level == SimdLevel::avx2) return avx2_kernels() != nullptr;
  return true;
}

SimdLevel parse_level(const char* text) {
  if (std::strcmp(text, "scalar") == 0) return SimdLevel::scalar;
  if (std::strcmp(text, "avx2") == 0) return SimdLevel::avx2;
  if (std::strcmp(text, "avx512") == 0) return SimdLevel::avx512;
  ZS_REQUIRE(false, std::string("ZEROSHARD_SIMD must be scalar, avx2 or avx512, got '") + text +
                        "'");
  return SimdLevel::scalar;
}

SimdLevel initial_level() {
  SimdLevel best = detected_simd_level();
  if (const char* env = std::getenv("ZEROSHARD_SIMD")) {
    const SimdLevel cap = parse_level(env);
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

std::atomic<int>& level_storage() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

int initial_threads() {
  if (const char* env = std::getenv("ZEROSHARD_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

// parallel_for's chunks per pool thread, and the element multiple their edges fall on.
constexpr int64_t kChunksPerThread = 8;
constexpr int64_t kChunkAlign = 64;

// True on a thread while it runs a pool task: a nested parallel_for then runs inline (the pool
// is busy with the outer job, and waiting for it would deadlock).
thread_local bool t_in_pool_task = false;

// A fixed set of workers that wait for one job at a time. Simple on purpose: the kernels are
// memory bound and each call is one big parallel loop, so one job queue slot is enough.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) { resize(threads); }
  ~ThreadPool() { stop_workers(); }

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void resize(int threads) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    stop_workers();
    uint64_t current;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = false;
      current = generation_;
    }
    // New workers must not mistake the last finished job for a new one: they start having
    // "seen" the current generation (else they decrement pending_ for a stale job and the
    // next run() can return before its tasks are done).
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, current] { worker_loop(current); });
  }

  // Runs task(t) for t in [0, tasks) over the workers and the caller.
  void run(int tasks, const std::function<void(int)>& task) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);  // one job at a time
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = &task;
      tasks_ = tasks;
      next_.store(0);
      pending_ = static_cast<int>(workers_.size());
      error_ = nullptr;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_ == 0; });
    task_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain() {
    t_in_pool_task = true;
    for (int t = next_.fetch_add(1); t < tasks_; t = next_.fetch_add(1)) {
      try {
        (*task_)(t);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
    t_in_pool_task = false;
  }

  void worker_loop(uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return stopping_ || generation_ != seen; });
        if (stopping_) return;
        seen = generation_;
      }
      drain();
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
    workers_.clear();
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  int tasks_ = 0;
  std::atomic<int> next_{0};
  int pending_ = 0;
  uint64_t generation_ = 0;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// The OpenMP runtime (GNU libgomp) when the process has already loaded it, as torch does. Its
// threads keep spinning for some milliseconds after each of torch's parallel ops; on a machine
// with as many cores as threads, zeroshard's own pool then shared cores with them and its steps
// ran up to 1.5x slower right after a torch op. Run on the same team instead: the spinning
// threads pick our work up at once. Never loaded by us (RTLD_NOLOAD): without torch, or with
// ZEROSHARD_OPENMP=0, the pool below does the work.
struct OpenMp {
  void (*parallel)(void (*fn)(void*), void* data, unsigned threads, unsigned flags) = nullptr;
};

OpenMp find_openmp() {
  OpenMp omp;
  if (const char* env = std::getenv("ZEROSHARD_OPENMP")) {
    if (std::strcmp(env, "0") == 0) return omp;
  }
  void* lib = dlopen("libgomp.so.1", RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return omp;
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(lib, "GOMP_parallel"));
  return omp;  // the handle stays open: its functions are used for the life of the process
}

// Found once loaded; until then looked for again on each call (torch may be imported later).
const OpenMp* openmp() {
  static std::atomic<const OpenMp*> found{nullptr};
  if (const OpenMp* omp = found.load(std::memory_order_acquire)) return omp;
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (const OpenMp* omp = found.load(std::memory_order_acquire)) return omp;
  const OpenMp omp = find_openmp();
  if (omp.parallel == nullptr) return nullptr;
  const OpenMp* kept = new OpenMp(omp);  // lives as long as the process, like the pool
  found.store(kept, std::memory_order_release);
  return kept;
}

// One parallel_for on the OpenMP team: tasks taken from a shared counter, as in the pool.
struct OpenMpJob {
  const std::function<void(int)>* task;
  int tasks;
  std::atomic<int> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;

  static void run(void* self) {
    auto* job = static_cast<OpenMpJob*>(self);
    const bool nested = t_in_pool_task;
    t_in_pool_task = true;
    for (int t = job->next.fetch_add(1); t < job->tasks; t = job->next.fetch_add(1)) {
      try {
        (*job->task)(t);
      } catch (...) {  // nothing may leave an OpenMP region
        std::lock_guard<std::mutex> lock(job->error_mutex);
        if (!job->error) job->error = std::current_exception();
      }
    }
    t_in_pool_task = nested;
  }
};

void run_on_openmp(const OpenMp& omp, int threads, int tasks, const std::function<void(int)>& task) {
  OpenMpJob job;
  job.task = &task;
  job.tasks = tasks;
  omp.parallel(&OpenMpJob::run, &job, static_cast<unsigned>(threads), 0);
  if (job.error) std::rethrow_exception(job.error);
}

ThreadPool& pool() {
  // Never destroyed: at process exit the workers may already be gone or blocked inside a
  // library (gloo, torch) that tears itself down in an order we do not control, and joining
  // them from a static destructor made processes abort ("terminate called without an active
  // exception"). The OS reclaims the threads.
  static ThreadPool* instance = new ThreadPool(initial_threads());
  return *instance;
}

}  // namespace

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::scalar: return "scalar";
    case SimdLevel::avx2: return "avx2";
    case SimdLevel::avx512: return "avx512";
  }
  return "unknown";
}

SimdLevel detected_simd_level() {
  for (SimdLevel l : {SimdLevel::avx512, SimdLevel::avx2}) {
    if (cpu_has(l) && build_has(l)) return l;
  }
  return SimdLevel::scalar;
}

SimdLevel simd_level() { return static_cast<SimdLevel>(level_storage().load()); }

void set_simd_level(SimdLevel level) {
  ZS_REQUIRE(cpu_has(level) && build_has(level),
             std::string("SIMD path '") + simd_level_name(level) +
                 "' is not available on this CPU/build (best: " +
                 simd_level_name(detected_simd_level()) + ")");
  level_storage().store(static_cast<int>(level));
}

int num_threads() { return pool().size(); }

void set_num_threads(int n) {
  ZS_REQUIRE(n >= 1, "num_threads must be >= 1, got " + std::to_string(n));
  ZS_REQUIRE(!t_in_pool_task, "set_num_threads cannot be called from inside a parallel_for task");
  if (n != pool().size()) pool().resize(n);
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = pool().size();
  const int64_t max_chunks = (n + grain - 1) / grain;
  // Several chunks per thread, taken first come first served: a thread that loses its core for
  // a while (on a small machine, to torch's OpenMP workers still spinning after the previous op)
  // no longer holds up the others with a fixed half of the work; they take its chunks instead.
  const int64_t chunks = std::min<int64_t>(static_cast<int64_t>(threads) * kChunksPerThread, max_chunks);
  if (threads <= 1 || chunks <= 1 || t_in_pool_task) {
    fn(0, n);
    return;
  }
  // Chunk edges on multiples of kChunkAlign elements: 2-byte outputs of neighbouring chunks then
  // never share a cache line (no false sharing between threads at the edges).
  int64_t per = (n + chunks - 1) / chunks;
  if (per >= kChunkAlign) per = (per + kChunkAlign - 1) / kChunkAlign * kChunkAlign;
  const int tasks = static_cast<int>((n + per - 1) / per);
  const std::function<void(int)> task = [&](int t) {
    const int64_t begin = t * per;
    const int64_t end = std::min(n, begin + per);
    if (begin < end) fn(begin, end);
  };
  if (const OpenMp* omp = openmp()) run_on_openmp(*omp, threads, tasks, task);
  else pool().run(tasks, task);
}

}  // namespace zeroshard::cpu
