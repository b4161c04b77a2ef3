// Threading helpers shared by the kernels (internal header).
// OpenMP is optional: without it every loop runs serially. Thread counts are set per region
// (num_threads clause), never with the process-wide setter, so a host application's own OpenMP use is
// left alone. No exception may leave an OpenMP region: the first one is captured and rethrown after.
#pragma once
#include <cstdint>
#include <exception>
#include <mutex>

#include "rec_engine/simd.hpp"

#if defined(REC_ENGINE_OPENMP)
#include <omp.h>
#endif

namespace rec_engine::detail {

// Below this many multiply-adds a call runs serially: starting threads would cost more than it saves.
constexpr int64_t kParallelWork = int64_t{1} << 17;

// The thread count for a region: the request (or the default), 1 when the work is small.
inline int threads_for(int requested, int64_t work, int64_t max_useful) {
  int nt = requested > 0 ? requested : default_num_threads();
  if (work < kParallelWork) nt = 1;
  if (max_useful < nt) nt = static_cast<int>(max_useful < 1 ? 1 : max_useful);
  return nt < 1 ? 1 : nt;
}

inline int thread_id() {
#if defined(REC_ENGINE_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Threads of the team running the enclosing parallel region (1 outside one).
inline int team_size() {
#if defined(REC_ENGINE_OPENMP)
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Captures the first exception thrown inside a parallel region.
class ExceptionSlot {
 public:
  template <class F>
  void run(F&& f) noexcept {
    try {
      f();
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
    }
  }
  void rethrow() {
    if (error_) std::rethrow_exception(error_);
  }
  bool failed() {
    std::lock_guard<std::mutex> lock(mu_);
    return error_ != nullptr;
  }

 private:
  std::mutex mu_;
  std::exception_ptr error_;
};

// for (i = 0; i < n; ++i) body(i), dynamically scheduled in chunks over nt threads.
template <class Body>
void parallel_for(int64_t n, int nt, int64_t chunk, Body&& body) {
  ExceptionSlot slot;
#if defined(REC_ENGINE_OPENMP)
#pragma omp parallel for num_threads(nt) schedule(dynamic, chunk) if (nt > 1)
#endif
  for (int64_t i = 0; i < n; ++i) {
    slot.run([&] { body(i); });
  }
  (void)nt;
  (void)chunk;
  slot.rethrow();
}

}  // namespace rec_engine::detail
