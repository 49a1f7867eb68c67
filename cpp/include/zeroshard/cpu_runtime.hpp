// How the CPU kernels run: which SIMD path (detected from the CPU at run time, never fixed at
// build time, so one wheel runs on any x86-64) and how many threads.
// Environment: ZEROSHARD_SIMD=scalar|avx2|avx512 caps the path; ZEROSHARD_NUM_THREADS sets the
// initial thread count (default: hardware concurrency); ZEROSHARD_OPENMP=0 keeps parallel_for on
// zeroshard's own pool even when the process has libgomp loaded (see parallel_for).
#pragma once

#include <cstdint>
#include <functional>

namespace zeroshard::cpu {

enum class SimdLevel : int { scalar = 0, avx2 = 1, avx512 = 2 };

const char* simd_level_name(SimdLevel level);
SimdLevel detected_simd_level();  // best the CPU supports (and the build contains)
SimdLevel simd_level();           // in use
void set_simd_level(SimdLevel level);  // throws InvalidArgument if the CPU lacks it

int num_threads();
void set_num_threads(int n);  // n >= 1

// Runs fn(begin, end) over [0, n) in contiguous chunks of at least `grain` elements on the
// pool; the calling thread takes part, and chunks go to whichever thread is free first. When the
// process has already loaded GNU OpenMP (torch does), the chunks run on its team instead, so
// torch's spinning workers and zeroshard's threads do not compete for the same cores.
// Exceptions from fn are rethrown on the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace zeroshard::cpu
