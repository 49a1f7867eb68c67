// Launch shape of the elementwise kernels: grid-stride loops over chunks with as many resident
// blocks as the kernel's occupancy allows on every SM, 32-bit indices unless n needs 64, and the
// runtime-dtype -> template dispatch. Owns: grid sizing and the dispatch helpers; no maths.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "chunk_access.cuh"
#include "cuda_check.hpp"
#include "zeroshard/dtype.hpp"

namespace zeroshard::gpu::detail {

constexpr int kThreads = 256;
constexpr int kMaxDevices = 64;

struct LaunchShape {
  int blocks;
  int threads;
};

int current_device();       // cudaGetDevice, checked
int sm_count(int device);   // cached per device

// Grid for a grid-stride kernel over `work_items` thread-steps: one full wave of resident blocks
// (occupancy from the kernel itself, cached per device), fewer when the work is small.
template <auto Kernel>
LaunchShape grid_stride_shape(int64_t work_items) {
  static std::array<std::atomic<int>, kMaxDevices> blocks_per_sm_cache{};
  const int device = current_device();
  int per_sm =
      device < kMaxDevices ? blocks_per_sm_cache[device].load(std::memory_order_relaxed) : 0;
  if (per_sm == 0) {
    ZS_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, kThreads, 0));
    per_sm = std::max(per_sm, 1);
    if (device < kMaxDevices) blocks_per_sm_cache[device].store(per_sm, std::memory_order_relaxed);
  }
  const int64_t needed = (work_items + kThreads - 1) / kThreads;
  const int64_t wave = static_cast<int64_t>(sm_count(device)) * per_sm;
  return {static_cast<int>(std::max<int64_t>(1, std::min(needed, wave))), kThreads};
}

// 32-bit indexing is safe when every element index and every chunk index a grid-stride loop
// can form (up to n plus one stride of chunks) stays below 2^31.
inline bool fits_int32(int64_t n, int64_t max_threads) {
  const int64_t limit = std::numeric_limits<int32_t>::max();
  return n + (max_threads + 1) * kChunk < limit;
}

// Upper bound on threads any of our grid-stride launches uses on `device`.
inline int64_t max_resident_threads(int device) {
  return static_cast<int64_t>(sm_count(device)) * 2048;
}

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;

// Calls f(DTypeTag<D>{}) for the runtime dtype d.
template <class F>
decltype(auto) dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::bf16: return f(DTypeTag<DType::bf16>{});
    case DType::f16: return f(DTypeTag<DType::f16>{});
    case DType::f32: break;
  }
  return f(DTypeTag<DType::f32>{});
}

// Calls f(std::true_type / std::false_type) for a runtime bool.
template <class F>
decltype(auto) dispatch_bool(bool b, F&& f) {
  if (b) return f(std::true_type{});
  return f(std::false_type{});
}

}  // namespace zeroshard::gpu::detail
