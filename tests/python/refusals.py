"""What building a ZeroAdamW on the stage-3 test model with these keywords refuses: the error's
text (ValueError or NotImplementedError), or None when it builds. A module-level function, so
dist_harness.run_distributed can run it on every rank."""
import zeroshard
from unit_net import make_unit_net


def refused(rank, world_size, kwargs):
    try:
        zeroshard.ZeroAdamW(make_unit_net(), lr=1e-3, **kwargs)
    except (ValueError, NotImplementedError) as e:
        return str(e)
    return None
