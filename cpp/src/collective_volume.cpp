// What a collective costs on the wire, shared by the NCCL and the gloo communicators.
#include <string>

#include "zeroshard/error.hpp"
#include "zeroshard/nccl_communicator.hpp"

namespace zeroshard::gpu {

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::all_reduce: return "all_reduce";
    case CollectiveKind::reduce_scatter: return "reduce_scatter";
    case CollectiveKind::all_gather: return "all_gather";
    case CollectiveKind::broadcast: return "broadcast";
  }
  return "unknown";
}

int64_t ring_bytes_sent(CollectiveKind kind, int64_t payload_bytes, int world_size) {
  ZS_REQUIRE(world_size >= 1, "world_size must be >= 1, got " + std::to_string(world_size));
  ZS_REQUIRE(payload_bytes >= 0, "payload_bytes must be >= 0");
  const int64_t n = world_size;
  switch (kind) {
    case CollectiveKind::all_reduce: return 2 * (n - 1) * payload_bytes / n;
    case CollectiveKind::reduce_scatter:
    case CollectiveKind::all_gather:
    case CollectiveKind::broadcast: return (n - 1) * payload_bytes / n;
  }
  return 0;
}

}  // namespace zeroshard::gpu
