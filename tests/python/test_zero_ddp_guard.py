"""A model already wrapped in DistributedDataParallel is refused: its gradients would be reduced
twice. Single process, world size 1 (DDP needs an initialised process group)."""
import os

import pytest
import torch
import torch.distributed as dist

import zeroshard


@pytest.fixture
def one_rank_group(tmp_path):
    store = dist.FileStore(os.path.join(tmp_path, "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_wrapped_parameters_are_refused(one_rank_group):
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 2))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        zeroshard.ZeroAdamW(ddp.parameters(), stage=2)
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        zeroshard.ZeroAdamW(ddp, stage=1)  # the module itself
    with pytest.raises(ValueError, match="DistributedDataParallel"):
        zeroshard.GradientReducer(model.parameters())
    other = torch.nn.Linear(5, 3)  # not wrapped: accepted while the DDP model lives
    opt = zeroshard.ZeroAdamW(other.parameters(), stage=2)
    assert len(opt.flat_groups) == 1


def _wrapped_after_stage3(rank, world_size):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ModuleList(
        [torch.nn.Linear(8, 8)]), torch.nn.Linear(8, 2))
    model.forward = lambda x: model[2](model[1][0](model[0](x)))
    zeroshard.ZeroAdamW(model, stage=3)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    try:
        ddp(torch.randn(4, 8)).sum().backward()
    except ValueError as e:
        return str(e)
    return None


def test_ddp_wrapped_after_a_stage3_optimizer_is_refused_before_autograd():
    """Before: autograd's 'invalid gradient ... expected shape compatible with [0]' crash."""
    from dist_harness import run_distributed
    for message in run_distributed(_wrapped_after_stage3, 2, timeout_s=120):
        assert message is not None and "DistributedDataParallel" in message, message
        assert "Drop the DDP wrapper" in message
