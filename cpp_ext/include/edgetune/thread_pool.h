// thread_pool.h — a small persistent std::thread pool (not OpenMP: torch ships its own libgomp).
#pragma once

#include <cstdint>

namespace edgetune {

using TaskFn = void (*)(void* ctx, int64_t task);

// Runs fn(ctx, t) for every t in [0, n_tasks) on the pool (the calling thread helps) and returns
// when all are done.  Tasks are claimed dynamically; callers make results independent of which
// thread runs a task.  Calls from inside a task, or while another call runs, are serialized.
void parallel_for(int64_t n_tasks, TaskFn fn, void* ctx);

// Lambda convenience; F is usually a TU-local lambda type, so no cross-TU instantiation clash.
template <class F>
void parallel_for(int64_t n_tasks, F& f) {
    parallel_for(n_tasks, [](void* c, int64_t t) { (*static_cast<F*>(c))(t); }, &f);
}

void pool_set_num_threads(int n);  // n <= 0: hardware concurrency
int pool_num_threads();

}  // namespace edgetune
