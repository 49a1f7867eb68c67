#include "zeroshard/layout.hpp"

#include <algorithm>
#include <string>

#include "zeroshard/error.hpp"

namespace zeroshard {

int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

Range Range::intersect(const Range& other) const {
  Range r{std::max(start, other.start), std::min(end, other.end)};
  if (r.end < r.start) r.end = r.start;
  return r;
}

Layout::Layout(std::vector<int64_t> numels, int world_size, int64_t align_elems,
               int64_t bucket_elems)
    : world_size_(world_size), align_elems_(align_elems) {
  ZS_REQUIRE(world_size >= 1, "world_size must be >= 1, got " + std::to_string(world_size));
  ZS_REQUIRE(align_elems >= 1, "align_elems must be >= 1, got " + std::to_string(align_elems));
  ZS_REQUIRE(bucket_elems >= 1, "bucket_elems must be >= 1, got " + std::to_string(bucket_elems));
  const int64_t unit = static_cast<int64_t>(world_size) * align_elems;
  bucket_elems_ = round_up(bucket_elems, unit);

  int64_t offset = 0;
  param_ranges_.reserve(numels.size());
  for (std::size_t i = 0; i < numels.size(); ++i) {
    ZS_REQUIRE(numels[i] >= 0, "parameter " + std::to_string(i) + " has negative numel " +
                                   std::to_string(numels[i]));
    offset = round_up(offset, align_elems);
    param_ranges_.push_back(Range{offset, offset + numels[i]});
    offset += numels[i];
  }
  buffer_numel_ = round_up(offset, unit);
  for (int64_t start = 0; start < buffer_numel_; start += bucket_elems_) {
    bucket_ranges_.push_back(Range{start, std::min(start + bucket_elems_, buffer_numel_)});
  }
}

void Layout::check_rank(int rank) const {
  ZS_REQUIRE(rank >= 0 && rank < world_size_, "rank " + std::to_string(rank) +
                                                  " is outside [0, " +
                                                  std::to_string(world_size_) + ")");
}

void Layout::check_bucket(int bucket) const {
  ZS_REQUIRE(bucket >= 0 && bucket < num_buckets(),
             "bucket " + std::to_string(bucket) + " is outside [0, " +
                 std::to_string(num_buckets()) + ")");
}

Range Layout::bucket_slice(int bucket, int rank) const {
  check_bucket(bucket);
  check_rank(rank);
  const Range& b = bucket_ranges_[bucket];
  const int64_t slice = b.size() / world_size_;
  return Range{b.start + rank * slice, b.start + (rank + 1) * slice};
}

int64_t Layout::bucket_slice_shard_offset(int bucket) const {
  check_bucket(bucket);
  // Every bucket before `bucket` is full size.
  return static_cast<int64_t>(bucket) * (bucket_elems_ / world_size_);
}

std::vector<Range> Layout::shard_ranges(int rank) const {
  check_rank(rank);
  std::vector<Range> out;
  out.reserve(bucket_ranges_.size());
  for (int b = 0; b < num_buckets(); ++b) out.push_back(bucket_slice(b, rank));
  return out;
}

int Layout::bucket_of_buffer_index(int64_t index) const {
  ZS_REQUIRE(index >= 0 && index < buffer_numel_,
             "buffer index " + std::to_string(index) + " is outside [0, " +
                 std::to_string(buffer_numel_) + ")");
  return static_cast<int>(index / bucket_elems_);
}

std::vector<int> Layout::params_in_bucket(int bucket) const {
  check_bucket(bucket);
  const Range& b = bucket_ranges_[bucket];
  std::vector<int> out;
  for (int p = 0; p < num_params(); ++p) {
    const Range& r = param_ranges_[p];
    const bool overlaps = r.empty() ? (r.start >= b.start && r.start < b.end)
                                    : !r.intersect(b).empty();
    if (overlaps) out.push_back(p);
  }
  return out;
}

std::vector<ShardPiece> Layout::shard_pieces(int rank) const {
  check_rank(rank);
  std::vector<ShardPiece> out;
  for (int b = 0; b < num_buckets(); ++b) {
    const Range slice = bucket_slice(b, rank);
    const int64_t shard_base = bucket_slice_shard_offset(b);
    // Parameters are sorted by start, so the overlapping ones are a contiguous run.
    auto first = std::lower_bound(param_ranges_.begin(), param_ranges_.end(), slice.start,
                                  [](const Range& r, int64_t s) { return r.end <= s; });
    for (auto it = first; it != param_ranges_.end() && it->start < slice.end; ++it) {
      const Range piece = it->intersect(slice);
      if (piece.empty()) continue;
      ShardPiece sp;
      sp.param = static_cast<int>(it - param_ranges_.begin());
      sp.bucket = b;
      sp.buffer_range = piece;
      sp.param_range = piece.shifted(-it->start);
      sp.shard_range = piece.shifted(shard_base - slice.start);
      out.push_back(sp);
    }
  }
  return out;
}

int64_t Layout::buffer_to_shard(int64_t buffer_index, int rank) const {
  check_rank(rank);
  if (buffer_index < 0 || buffer_index >= buffer_numel_) return -1;
  const int b = static_cast<int>(buffer_index / bucket_elems_);
  const Range slice = bucket_slice(b, rank);
  if (buffer_index < slice.start || buffer_index >= slice.end) return -1;
  return bucket_slice_shard_offset(b) + (buffer_index - slice.start);
}

int64_t Layout::shard_to_buffer(int64_t shard_index, int rank) const {
  check_rank(rank);
  if (shard_index < 0 || shard_index >= shard_numel()) return -1;
  const int64_t per_bucket = bucket_elems_ / world_size_;
  const int b = static_cast<int>(shard_index / per_bucket);
  const Range slice = bucket_slice(b, rank);
  const int64_t offset = shard_index - static_cast<int64_t>(b) * per_bucket;
  return offset < slice.size() ? slice.start + offset : -1;
}

}  // namespace zeroshard
