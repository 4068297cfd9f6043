// thread_pool.cpp — the persistent worker pool behind parallel_for (see thread_pool.h).
#include "edgetune/thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace edgetune {
namespace {

thread_local bool t_inside = false;  // true on pool workers and while a job runs on this thread

class Pool {
public:
    explicit Pool(int n_threads) : n_threads_(std::max(1, n_threads)) {
        for (int i = 1; i < n_threads_; ++i) workers_.emplace_back([this] { worker_loop(); });
    }
    ~Pool() {
        {
            std::lock_guard<std::mutex> lk(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
    }
    int size() const { return n_threads_; }

    void run(int64_t n_tasks, TaskFn fn, void* ctx) {
        if (n_tasks <= 0) return;
        if (n_threads_ == 1 || n_tasks == 1) {
            for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
            return;
        }
        {
            std::lock_guard<std::mutex> lk(m_);
            fn_ = fn;
            ctx_ = ctx;
            n_tasks_ = n_tasks;
            next_.store(0, std::memory_order_relaxed);
            busy_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
            ++generation_;
        }
        cv_.notify_all();
        drain();
        // wait for the workers to finish their last task (spin briefly: jobs are short)
        for (int spins = 0; busy_.load(std::memory_order_acquire) != 0; ++spins)
            if (spins > 1000) std::this_thread::yield();
    }

private:
    void drain() {
        for (;;) {
            const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
            if (t >= n_tasks_) break;
            fn_(ctx_, t);
        }
    }
    void worker_loop() {
        t_inside = true;
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lk(m_);
                cv_.wait(lk, [&] { return stop_ || generation_ != seen; });
                if (stop_) return;
                seen = generation_;
            }
            drain();
            busy_.fetch_sub(1, std::memory_order_release);
        }
    }

    int n_threads_;
    std::vector<std::thread> workers_;
    std::mutex m_;
    std::condition_variable cv_;
    bool stop_ = false;
    uint64_t generation_ = 0;
    TaskFn fn_ = nullptr;
    void* ctx_ = nullptr;
    int64_t n_tasks_ = 0;
    std::atomic<int64_t> next_{0};
    std::atomic<int> busy_{0};
};

std::mutex g_job_mutex;  // one parallel_for at a time; also guards g_pool replacement
std::unique_ptr<Pool> g_pool;

int default_threads() {
    const unsigned hc = std::thread::hardware_concurrency();
    return hc ? static_cast<int>(hc) : 1;
}

Pool& pool_locked() {
    if (!g_pool) g_pool.reset(new Pool(default_threads()));
    return *g_pool;
}

}  // namespace

void parallel_for(int64_t n_tasks, TaskFn fn, void* ctx) {
    if (t_inside) {  // nested: run inline rather than deadlock
        for (int64_t t = 0; t < n_tasks; ++t) fn(ctx, t);
        return;
    }
    std::lock_guard<std::mutex> lk(g_job_mutex);
    t_inside = true;
    pool_locked().run(n_tasks, fn, ctx);
    t_inside = false;
}

void pool_set_num_threads(int n) {
    if (n <= 0) n = default_threads();
    std::lock_guard<std::mutex> lk(g_job_mutex);
    if (g_pool && g_pool->size() == n) return;
    g_pool.reset();
    g_pool.reset(new Pool(n));
}

int pool_num_threads() {
    std::lock_guard<std::mutex> lk(g_job_mutex);
    return pool_locked().size();
}

}  // namespace edgetune
