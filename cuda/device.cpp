// The CUDA devices this process sees, and per-device facts the launches need (SM counts).
// Owns: device queries. Never throws where there is no driver: device_count() returns 0 then,
// which keeps `import zeroshard` and `python -m zeroshard.env` working on driverless machines.
#include <cuda_runtime_api.h>

#include <array>
#include <atomic>
#include <string>

#include "cuda_check.hpp"
#include "zeroshard/error.hpp"
#include "zeroshard/gpu_kernels.hpp"

namespace zeroshard::gpu {

namespace detail {

int current_device() {
  int device = 0;
  ZS_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

int sm_count(int device) {
  static std::array<std::atomic<int>, 64> cache{};
  int count = device >= 0 && device < 64 ? cache[device].load(std::memory_order_relaxed) : 0;
  if (count == 0) {
    ZS_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    if (device >= 0 && device < 64) cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace detail

bool built_with_cuda() { return true; }

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    (void)cudaGetLastError();  // no driver / no device: not an error for this question
    return 0;
  }
  return count;
}

std::string device_name(int device) {
  const int count = device_count();
  ZS_REQUIRE(device >= 0 && device < count,
             "device " + std::to_string(device) + " does not exist: this process sees " +
                 std::to_string(count) + " CUDA device(s)");
  cudaDeviceProp prop{};
  ZS_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  return prop.name;
}

}  // namespace zeroshard::gpu
