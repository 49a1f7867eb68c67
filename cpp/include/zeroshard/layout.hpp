// Layout: where each parameter lives in one flat buffer, how that buffer is cut into buckets,
// and which slice of every bucket each rank owns. Pure data, computed once, no allocation.
//
// Index spaces (never mix them without a conversion below):
//   buffer — element offset into the flat buffer (all parameters of one dtype, padded);
//   bucket — offset inside one bucket (a buffer range reduced by one collective);
//   shard  — offset inside one rank's local shard, which concatenates that rank's slice of every
//            bucket in bucket order (so a shard is contiguous locally but not in buffer space);
//   param  — offset inside one parameter's own elements.
//
// Each parameter starts on a multiple of `align_elems`. Buckets are `bucket_elems` rounded up to a
// multiple of world_size * align_elems (the last one is shorter but still such a multiple), so
// every bucket divides evenly into world_size slices: a reduce-scatter of bucket b leaves rank r
// with slice r of it. Buckets and slices cut through parameters; consumers handle the pieces.
#pragma once

#include <cstdint>
#include <vector>

namespace zeroshard {

struct Range {
  int64_t start = 0;
  int64_t end = 0;  // exclusive

  int64_t size() const { return end - start; }
  bool empty() const { return end <= start; }
  Range intersect(const Range& other) const;
  Range shifted(int64_t by) const { return Range{start + by, end + by}; }
  bool operator==(const Range& o) const { return start == o.start && end == o.end; }
};

// One piece of a parameter that falls inside one rank's shard.
struct ShardPiece {
  int param = 0;       // parameter index
  int bucket = 0;      // bucket index
  Range param_range;   // param space
  Range shard_range;   // shard space of the owning rank
  Range buffer_range;  // buffer space
};

class Layout {
 public:
  // numels: elements per parameter, in buffer order (0 allowed). world_size >= 1,
  // align_elems >= 1, bucket_elems >= 1. Throws InvalidArgument otherwise.
  Layout(std::vector<int64_t> numels, int world_size, int64_t align_elems, int64_t bucket_elems);

  int world_size() const { return world_size_; }
  int64_t align_elems() const { return align_elems_; }
  int64_t bucket_elems() const { return bucket_elems_; }  // after rounding
  int num_params() const { return static_cast<int>(param_ranges_.size()); }
  int num_buckets() const { return static_cast<int>(bucket_ranges_.size()); }
  int64_t buffer_numel() const { return buffer_numel_; }  // padded total
  int64_t shard_numel() const { return buffer_numel_ / world_size_; }  // the same on every rank

  const std::vector<Range>& param_ranges() const { return param_ranges_; }    // buffer space
  const std::vector<Range>& bucket_ranges() const { return bucket_ranges_; }  // buffer space

  // Rank's slice of one bucket, in buffer space, and where it sits in that rank's shard.
  Range bucket_slice(int bucket, int rank) const;
  int64_t bucket_slice_shard_offset(int bucket) const;  // shard space; equal for all ranks

  // All of rank's slices in buffer space, one per bucket, in shard order.
  std::vector<Range> shard_ranges(int rank) const;

  // Parameters overlapping a bucket (first, last+1). Empty params are listed with the bucket
  // that holds their start (or none if the buffer is empty).
  std::vector<int> params_in_bucket(int bucket) const;
  int bucket_of_buffer_index(int64_t index) const;

  // Every non-empty intersection of a parameter with rank's shard, in shard order.
  std::vector<ShardPiece> shard_pieces(int rank) const;

  // Conversions between index spaces. Return -1 when the element is not in rank's shard.
  int64_t buffer_to_shard(int64_t buffer_index, int rank) const;
  int64_t shard_to_buffer(int64_t shard_index, int rank) const;

 private:
  void check_rank(int rank) const;
  void check_bucket(int bucket) const;

  int world_size_;
  int64_t align_elems_;
  int64_t bucket_elems_;
  int64_t buffer_numel_ = 0;
  std::vector<Range> param_ranges_;
  std::vector<Range> bucket_ranges_;
};

int64_t round_up(int64_t value, int64_t multiple);

}  // namespace zeroshard
