"""flat_layout: a group's buckets, without a sliver of a last bucket.

A last bucket under SLIVER of the bucket size would cost a whole collective (stage 3 gathers it
twice a step) for a few elements; flat_layout cuts the group into one bucket fewer of equal
size instead. The optimizer's FlatGroups and the estimator both build their layouts with it, so
the estimate and memory_report() agree (checked in test_estimate.py and test_zero_stage3.py)."""
import random

from zeroshard import _core
from zeroshard.memory.estimate import build_layout
from zeroshard.sharding.flat_group import SLIVER, flat_layout


def sizes(layout):
    return [r.end - r.start for r in layout.bucket_ranges]


def test_a_sliver_joins_the_other_buckets():
    # 2.05 buckets' worth (a gpt-17m block at the automatic bucket): 3 buckets in the core's
    # cut, the last 2.5% of a bucket; 2 equal ones here.
    bucket = 1024
    numels = [2 * bucket + 48]
    core = _core.Layout(numels, 2, 16, bucket)
    assert sizes(core) == [1024, 1024, 64]
    layout = flat_layout(numels, 2, 16, bucket)
    assert sizes(layout) == [1056, 1056]
    assert layout.buffer_numel == core.buffer_numel


def test_a_last_bucket_of_a_quarter_or_more_stays():
    numels = [2 * 1024 + 256]
    assert sizes(flat_layout(numels, 2, 16, 1024)) == [1024, 1024, 256]
    assert sizes(flat_layout([1024], 2, 16, 1024)) == [1024]
    assert sizes(flat_layout([100], 2, 16, 1024)) == [128]  # one bucket: nothing to join


def test_buckets_grow_by_less_than_a_sliver_and_never_multiply():
    rng = random.Random(0)
    merged = 0
    for _ in range(3000):
        world, align = rng.choice([1, 2, 3, 4, 7]), rng.choice([1, 16, 64])
        numels = [rng.randint(0, 5000) for _ in range(rng.randint(1, 6))]
        bucket = rng.randint(1, 8000)
        core = _core.Layout(numels, world, align, bucket)
        layout = flat_layout(numels, world, align, bucket)
        case = (numels, world, align, bucket)
        assert layout.buffer_numel == core.buffer_numel, case
        assert [(r.start, r.end) for r in layout.param_ranges] == \
            [(r.start, r.end) for r in core.param_ranges], case
        assert layout.num_buckets <= core.num_buckets, case
        assert layout.bucket_elems < (1 + SLIVER) * core.bucket_elems, case
        merged += layout.num_buckets < core.num_buckets
    assert merged > 100  # the sweep does reach the case it is about


def test_the_estimator_cuts_as_the_optimizer_does():
    layout = build_layout([2 * 1024 * 32 + 48 * 32], world_size=2, dtype="fp32",
                          bucket_mb=1024 * 32 * 4 / 2 ** 20)
    assert layout.num_buckets == 2
