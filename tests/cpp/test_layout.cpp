// Layout: every element of every parameter lands in exactly one rank's shard, the index-space
// conversions round-trip, and all cuts respect the alignment, for awkward sizes on purpose.
#include <algorithm>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "check.hpp"
#include "zeroshard/error.hpp"
#include "zeroshard/layout.hpp"

using zeroshard::InvalidArgument;
using zeroshard::Layout;
using zeroshard::Range;
using zeroshard::ShardPiece;

namespace {

std::string describe(const std::vector<int64_t>& numels, int world, int64_t align, int64_t bucket) {
  std::string s = "numels=[";
  for (std::size_t i = 0; i < numels.size() && i < 8; ++i) s += std::to_string(numels[i]) + ",";
  return s + "] world=" + std::to_string(world) + " align=" + std::to_string(align) +
         " bucket=" + std::to_string(bucket);
}

void check_layout(const std::vector<int64_t>& numels, int world, int64_t align, int64_t bucket) {
  const Layout layout(numels, world, align, bucket);
  const std::string ctx = describe(numels, world, align, bucket);
  const int64_t unit = world * align;

  // Alignment of every cut.
  CHECK_MSG(layout.buffer_numel() % unit == 0, ctx);
  CHECK_MSG(layout.bucket_elems() % unit == 0 && layout.bucket_elems() >= bucket, ctx);
  CHECK_MSG(layout.shard_numel() * world == layout.buffer_numel(), ctx);
  int64_t param_total = 0;
  for (int p = 0; p < layout.num_params(); ++p) {
    const Range& r = layout.param_ranges()[p];
    CHECK_MSG(r.start % align == 0 && r.size() == numels[p], ctx + " param " + std::to_string(p));
    CHECK_MSG(r.end <= layout.buffer_numel(), ctx);
    if (p > 0) CHECK_MSG(r.start >= layout.param_ranges()[p - 1].end, ctx);  // no overlap
    param_total += r.size();
  }
  int64_t covered = 0;
  for (int b = 0; b < layout.num_buckets(); ++b) {
    const Range& br = layout.bucket_ranges()[b];
    CHECK_MSG(br.start == covered && br.size() % unit == 0 && br.size() > 0, ctx);
    covered = br.end;
    int64_t slice_total = 0;
    for (int r = 0; r < world; ++r) {
      const Range s = layout.bucket_slice(b, r);
      CHECK_MSG(s.start % align == 0 && s.size() % align == 0, ctx);
      CHECK_MSG(s.size() == br.size() / world, ctx);
      slice_total += s.size();
    }
    CHECK_MSG(slice_total == br.size(), ctx);
  }
  CHECK_MSG(covered == layout.buffer_numel(), ctx);

  // Every buffer element is owned by exactly one rank, and the conversions round-trip.
  int64_t owned_total = 0;
  for (int64_t i = 0; i < layout.buffer_numel(); ++i) {
    int owners = 0;
    for (int r = 0; r < world; ++r) {
      const int64_t s = layout.buffer_to_shard(i, r);
      if (s < 0) continue;
      ++owners;
      CHECK_MSG(s < layout.shard_numel(), ctx);
      CHECK_MSG(layout.shard_to_buffer(s, r) == i, ctx + " index " + std::to_string(i));
    }
    CHECK_MSG(owners == 1, ctx + " buffer index " + std::to_string(i) + " has " +
                               std::to_string(owners) + " owners");
    owned_total += owners;
  }
  CHECK_MSG(owned_total == layout.buffer_numel(), ctx);
  for (int r = 0; r < world; ++r) {
    int64_t shard_ranges_total = 0;
    for (const Range& s : layout.shard_ranges(r)) shard_ranges_total += s.size();
    CHECK_MSG(shard_ranges_total == layout.shard_numel(), ctx);
    for (int64_t s = 0; s < layout.shard_numel(); ++s) {
      const int64_t i = layout.shard_to_buffer(s, r);
      CHECK_MSG(i >= 0 && layout.buffer_to_shard(i, r) == s, ctx + " shard index " + std::to_string(s));
    }
    CHECK_MSG(layout.shard_to_buffer(-1, r) == -1 && layout.shard_to_buffer(layout.shard_numel(), r) == -1, ctx);
    CHECK_MSG(layout.buffer_to_shard(-1, r) == -1 && layout.buffer_to_shard(layout.buffer_numel(), r) == -1, ctx);
  }

  // shard_pieces of all ranks tile each parameter exactly once, with consistent ranges.
  std::vector<std::vector<ShardPiece>> per_param(numels.size());
  for (int r = 0; r < world; ++r) {
    int64_t last_shard_end = -1;
    for (const ShardPiece& piece : layout.shard_pieces(r)) {
      CHECK_MSG(piece.param >= 0 && piece.param < layout.num_params(), ctx);
      if (piece.param < 0 || piece.param >= layout.num_params()) continue;
      const Range& pr = layout.param_ranges()[piece.param];
      CHECK_MSG(!piece.param_range.empty(), ctx);
      CHECK_MSG(piece.buffer_range == piece.param_range.shifted(pr.start), ctx);
      CHECK_MSG(piece.shard_range.size() == piece.param_range.size(), ctx);
      CHECK_MSG(layout.buffer_to_shard(piece.buffer_range.start, r) == piece.shard_range.start, ctx);
      CHECK_MSG(layout.buffer_to_shard(piece.buffer_range.end - 1, r) == piece.shard_range.end - 1, ctx);
      CHECK_MSG(layout.bucket_of_buffer_index(piece.buffer_range.start) == piece.bucket, ctx);
      CHECK_MSG(piece.shard_range.start >= last_shard_end, ctx + " pieces out of shard order");
      last_shard_end = piece.shard_range.end;
      per_param[piece.param].push_back(piece);
    }
  }
  for (std::size_t p = 0; p < numels.size(); ++p) {
    auto& pieces = per_param[p];
    std::sort(pieces.begin(), pieces.end(), [](const ShardPiece& a, const ShardPiece& b) {
      return a.param_range.start < b.param_range.start;
    });
    int64_t next = 0;
    for (const ShardPiece& piece : pieces) {
      CHECK_MSG(piece.param_range.start == next, ctx + " param " + std::to_string(p) + " gap/overlap");
      next = piece.param_range.end;
    }
    CHECK_MSG(next == numels[p], ctx + " param " + std::to_string(p) + " not fully covered");
  }
  (void)param_total;
}

}  // namespace

TEST(awkward_sizes_all_world_sizes) {
  const std::vector<std::vector<int64_t>> cases = {
      {},          {0},          {1},          {0, 0, 5, 0},        {2, 3, 5, 7, 11, 13, 101},
      {71, 71, 71}, {4096, 1, 4095}, {997, 0, 1009, 1}, {17},
  };
  for (const auto& numels : cases)
    for (int world = 1; world <= 5; ++world)
      for (int64_t align : {1, 4, 32})
        for (int64_t bucket : {1, 3, 7, 71, 1 << 20}) check_layout(numels, world, align, bucket);
}

TEST(random_sizes) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 40; ++trial) {
    std::vector<int64_t> numels(rng() % 12);
    for (auto& n : numels) n = rng() % 3 == 0 ? 0 : static_cast<int64_t>(rng() % 500);
    check_layout(numels, 1 + static_cast<int>(rng() % 5), 1 + rng() % 16, 1 + rng() % 300);
  }
}

TEST(large_prime_param) { check_layout({1000003}, 3, 32, 1 << 16); }

TEST(bad_arguments_throw) {
  CHECK_THROWS(InvalidArgument, Layout({1}, 0, 1, 1));
  CHECK_THROWS(InvalidArgument, Layout({1}, 1, 0, 1));
  CHECK_THROWS(InvalidArgument, Layout({1}, 1, 1, 0));
  CHECK_THROWS(InvalidArgument, Layout({4, -1}, 2, 1, 8));
  const Layout layout({10, 20}, 2, 4, 8);
  CHECK_THROWS(InvalidArgument, layout.bucket_slice(0, 2));
  CHECK_THROWS(InvalidArgument, layout.bucket_slice(-1, 0));
  CHECK_THROWS(InvalidArgument, layout.bucket_slice(layout.num_buckets(), 0));
  CHECK_THROWS(InvalidArgument, layout.shard_pieces(-1));
  CHECK_THROWS(InvalidArgument, layout.shard_ranges(2));
  CHECK_THROWS(InvalidArgument, layout.buffer_to_shard(0, 5));
  CHECK_THROWS(InvalidArgument, layout.shard_to_buffer(0, -1));
  CHECK_THROWS(InvalidArgument, layout.bucket_of_buffer_index(layout.buffer_numel()));
  CHECK_THROWS(InvalidArgument, layout.params_in_bucket(layout.num_buckets()));
}

TEST(params_in_bucket_lists_straddlers) {
  const Layout layout({5, 9, 0, 3}, 2, 1, 4);  // buckets of 4: params straddle them
  for (int b = 0; b < layout.num_buckets(); ++b) {
    const Range& br = layout.bucket_ranges()[b];
    const std::vector<int> listed = layout.params_in_bucket(b);
    for (int p = 0; p < layout.num_params(); ++p) {
      const Range& pr = layout.param_ranges()[p];
      const bool expected = pr.empty() ? (pr.start >= br.start && pr.start < br.end)
                                       : (pr.start < br.end && br.start < pr.end);
      const bool found = std::find(listed.begin(), listed.end(), p) != listed.end();
      CHECK_MSG(expected == found, "bucket " + std::to_string(b) + " param " + std::to_string(p));
    }
  }
}

int main() { return zs_test::run_tests(); }
