"""UnitNet: the stage-3 test model, a tiny transformer-shaped net with the structures stage 3
must handle.

Blocks in an nn.ModuleList (the default units) with awkward sizes (hidden 101, 102, 103...), an
embedding tied to the output head (a parameter shared by the root's two modules), a root-level
parameter used by indexing (most entries get exact-zero gradients), and switches for the idioms
the tests exercise: activation checkpointing, a block called twice, a frozen block, a branch.
Its loss has the oracle's shape (zero_oracle.mse_loss: output (batch, WIDTH)).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from zero_oracle import HIDDEN, VOCAB, WIDTH

CODEBOOK = 997


class Block(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(torch.tanh(self.fc1(h)))


class UnitNet(nn.Module):
    def __init__(self, n_blocks: int = 3, checkpointing: str = "", twice: bool = False,
                 frozen_block: bool = False, skip_block_on_rank=None,
                 changing_order: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(Block(WIDTH, HIDDEN + i) for i in range(n_blocks))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied, as in GPT-2
        self.codebook = nn.Parameter(torch.randn(CODEBOOK) * 0.1)
        self.checkpointing, self.twice = checkpointing, twice
        self.skip_block_on_rank = skip_block_on_rank  # (block, rank): a rank-dependent branch
        # Every rank alike: blocks in reverse order on odd forwards, block 1 skipped on every
        # third (stage 3 must re-plan its prefetch, not hang or mix weights).
        self.changing_order = changing_order
        self.forwards = 0
        if frozen_block:
            self.blocks[0].requires_grad_(False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        order = list(enumerate(self.blocks))
        if self.changing_order:
            self.forwards += 1
            if self.forwards % 2 == 0:
                order.reverse()
            if self.forwards % 3 == 0:
                order = [(i, b) for i, b in order if i != 1]
        for i, block in order:
            if self.skip_block_on_rank is not None and self.skip_block_on_rank == (
                    i, torch.distributed.get_rank()):
                continue
            if self.checkpointing:
                h = checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
            else:
                h = block(h)
            if self.twice and i == 1:
                h = block(h)
        logits = self.head(self.norm(h))
        return logits[:, :WIDTH] + self.codebook[(tokens * 61) % CODEBOOK].unsqueeze(-1)


def make_unit_net(seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> UnitNet:
    torch.manual_seed(seed)
    return UnitNet(**kwargs).to(dtype)
