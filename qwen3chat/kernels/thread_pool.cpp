// qk::parallel_for: the kernels' loops over their threads, which never wait for a thread
// that has not started.
//
// at::parallel_for (OpenMP) gives each thread of its team a fixed share and ends at a
// barrier all of them must reach. A decode step runs ~200 such loops; where another
// process takes a core, one of the two threads is often descheduled, and every loop waits
// a scheduler slice for it: with one busy process beside it on two cores, Q4_0 decode of
// the 0.6B shape fell from 51 to 13 tok/s (one thread alone made 30; llama.cpp fell from
// 26 to 7-9). Here the calling thread and the workers take chunks from one counter, and the
// caller waits only for chunks a worker has taken: a worker that is not running leaves its
// share to the others. Between loops a worker spins briefly (decode's loops come tens of
// microseconds apart), then sleeps until the next one.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>
#include <c10/util/ParallelGuard.h>
#include <pthread.h>

#include "kernels.h"

namespace qk {
namespace {

inline void pause() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// A loop's chunks per thread: enough that a worker woken late still finds a share, few
// enough that each chunk's setup stays small beside it.
constexpr int64_t kChunksPerThread = 4;
// How long an idle worker spins before it sleeps.
constexpr auto kSpin = std::chrono::microseconds(100);

thread_local bool in_loop = false;

// One call's range, cut into `chunks` nearly equal parts.
struct Loop {
  int64_t begin, n, chunks;
  void* body;
  void (*call)(void*, int64_t, int64_t);
  void run_chunk(int64_t c) const {
    call(body, begin + c * n / chunks, begin + (c + 1) * n / chunks);
  }
};

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { work(); });
  }

  int size() const { return static_cast<int>(threads_.size()) + 1; }

  void stop() {
    {
      std::lock_guard<std::mutex> lock(sleep_);
      stopping_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  // Runs each of the loop's chunks on this thread or a worker; returns once all have run.
  void run(const Loop& loop) {
    loop_.store(&loop, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t job = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(job << 32 | static_cast<uint64_t>(loop.chunks) << 16, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    take_chunks(job);
    for (int spins = 0; done_.load(std::memory_order_acquire) < loop.chunks; ++spins) {
      // A chunk a descheduled worker holds: let it have this core.
      if (spins % 1024 == 1023) std::this_thread::yield();
      pause();
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  // Runs chunks of loop `job` while it has unclaimed ones (and no newer loop replaced it).
  void take_chunks(uint64_t job) {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      // The count is in the same word as the next chunk: a worker still holding the last
      // loop's word cannot claim past its end while the next loop is being set up.
      const uint64_t chunk = state & 0xFFFFu, chunks = state >> 16 & 0xFFFFu;
      if (state >> 32 != job || chunk >= chunks) return;
      // Only a claimed chunk proves the loop is still `job`: it cannot end before the chunk
      // does, so the loop read below is still that one.
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel)) continue;
      const Loop& loop = *loop_.load(std::memory_order_relaxed);
      try {
        loop.run_chunk(static_cast<int64_t>(chunk));
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_lock_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void work() {
    flush_subnormals_here();  // MXCSR is per thread
    in_loop = true;
    const c10::ParallelGuard in_parallel(true);  // torch's operations in a chunk: one thread
    uint64_t seen = 0;
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kSpin;
      uint64_t job = state_.load(std::memory_order_acquire) >> 32;
      for (int spins = 0; job == seen; ++spins) {
        if (spins % 64 == 63 && std::chrono::steady_clock::now() > until) break;
        pause();
        job = state_.load(std::memory_order_acquire) >> 32;
      }
      if (job == seen) {
        std::unique_lock<std::mutex> lock(sleep_);
        sleepers_.fetch_add(1, std::memory_order_seq_cst);
        while ((job = state_.load(std::memory_order_seq_cst) >> 32) == seen && !stopping_)
          wake_.wait(lock);
        sleepers_.fetch_sub(1, std::memory_order_relaxed);
        if (stopping_) return;
      }
      seen = job;
      take_chunks(job);
    }
  }

  std::vector<std::thread> threads_;
  // The loop now running in the high 32 bits, its chunk count in the next 16 and its next
  // unclaimed chunk in the low 16.
  std::atomic<uint64_t> state_{0};
  std::atomic<const Loop*> loop_{nullptr};
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::mutex sleep_, error_lock_;
  std::condition_variable wake_;
  bool stopping_ = false;
  std::exception_ptr error_;
};

// Not destroyed at exit (its workers would outlive the static destructors); a forked child
// starts a new one, as the threads did not come with it.
Pool* pool = nullptr;
std::mutex pool_lock;

void forget_pool_after_fork() {
  pool = nullptr;
  new (&pool_lock) std::mutex();
}

}  // namespace

void run_parallel(int64_t begin, int64_t end, int64_t grain, void* body,
                  void (*call)(void*, int64_t, int64_t)) {
  const int64_t n = end - begin;
  const int threads = at::get_num_threads();
  grain = std::max<int64_t>(grain, 1);
  // As at::parallel_for: one thread for a loop smaller than its grain, inside another
  // loop, or inside torch's own parallel region; and here also while another thread (the
  // server's engine beside a test's) holds the pool.
  std::unique_lock<std::mutex> lock(pool_lock, std::defer_lock);
  const bool alone = threads <= 1 || n <= grain || in_loop || at::in_parallel_region();
  const c10::ParallelGuard in_parallel(true);  // torch's operations in a chunk: one thread
  if (alone || !lock.try_lock()) {
    if (n > 0) call(body, begin, end);
    return;
  }
  static std::once_flag at_fork;
  std::call_once(at_fork, [] { pthread_atfork(nullptr, nullptr, forget_pool_after_fork); });
  if (pool == nullptr || pool->size() != threads) {
    if (pool != nullptr) {  // torch.set_num_threads changed the count
      pool->stop();
      delete pool;
    }
    pool = new Pool(threads - 1);
  }
  const int64_t chunks = std::min<int64_t>({(n + grain - 1) / grain, threads * kChunksPerThread, 0xFFFF});
  struct InLoop {
    InLoop() { in_loop = true; }
    ~InLoop() { in_loop = false; }
  } const inside;
  pool->run(Loop{begin, n, chunks, body, call});
}

}  // namespace qk
