"""A small GPT and its synthetic training data, self-contained (no downloads).

Owns: `GPTConfig` and its presets, the `GPT` module (token + position embeddings, pre-LayerNorm
blocks with causal self-attention and a GELU MLP, final LayerNorm, LM head tied to the token
embedding), its seeded initialisation, and `MarkovTokenStream`, a deterministic token stream drawn
from a fixed sparse random Markov chain so the loss falls visibly within a few dozen steps.
Knows nothing of optimizers, process groups or devices beyond `.to()`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int  # longest sequence the position table holds
    n_layer: int
    n_head: int
    d_model: int
    mlp_ratio: int = 4
    default_seq_len: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "mlp_ratio",
                     "default_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ValueError(f"GPTConfig.d_model ({self.d_model}) must divide by n_head "
                             f"({self.n_head})")
        if self.default_seq_len > self.block_size:
            raise ValueError("GPTConfig.default_seq_len must not exceed block_size")


# Sizes are approximate parameter counts (tied head counted once).
PRESETS: Dict[str, GPTConfig] = {
    # ~0.84M: 2 CPU ranks run 100 steps in seconds.
    "tiny": GPTConfig(vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128),
    # ~9.6M: big enough that model-state memory shows in a CPU process's RSS.
    "small": GPTConfig(vocab_size=512, block_size=256, n_layer=12, n_head=4, d_model=256),
    # Issue 9's benchmark model: 13.8M with the tied head counted once (the issue's "about
    # 17M" counts the head's 3.1M a second time).
    "gpt-17m": GPTConfig(vocab_size=8192, block_size=128, n_layer=6, n_head=6, d_model=384,
                         default_seq_len=128),
    # ~110M (110,418,432): GPT-2 small's body with a 32k vocabulary and 256 positions, the
    # benchmark's >= 100M model that still fits two CPU ranks.
    "gpt-110m": GPTConfig(vocab_size=32768, block_size=256, n_layer=12, n_head=12, d_model=768,
                          default_seq_len=256),
    # ~124M, GPT-2 small shape.
    "gpt2": GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12, d_model=768,
                      default_seq_len=1024),
    # ~355M, GPT-2 medium shape: a GPU run.
    "gpt2-medium": GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16,
                             d_model=1024, default_seq_len=1024),
    # ~1.56B, GPT-2 XL shape: the CPU-offload benchmark of issue 11 (one GPU).
    "gpt2-xl": GPTConfig(vocab_size=50304, block_size=1024, n_layer=48, n_head=25,
                         d_model=1600, default_seq_len=1024),
}


def preset(name: str) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"model preset {name!r} is unknown; pick one of {sorted(PRESETS)}")
    return PRESETS[name]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=2)
        # (batch, seq, width) -> (batch, head, seq, head_width)
        q, k, v = (t.view(batch, seq, self.n_head, width // self.n_head).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, width))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(config.d_model, config.mlp_ratio * config.d_model)
        self.proj = nn.Linear(config.mlp_ratio * config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_attn(x))
        return x + self.mlp(self.ln_mlp(x))


class GPT(nn.Module):
    """Decoder-only transformer; `forward(tokens, targets)` returns the mean cross-entropy."""

    def __init__(self, config: GPTConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_final = nn.LayerNorm(config.d_model)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """GPT-2 init from one generator, in `named_parameters` order, so every rank (and every
        run with the same seed) starts from bit-identical weights. On CPU the weights are drawn
        on the host; a model built on a GPU draws there (seconds saved per 355M parameters;
        the same distributions, other values)."""
        device = next(self.parameters()).device
        if device.type == "meta":  # shapes only (counting parameters): nothing to draw
            return
        on_host = device.type == "cpu"
        generator = torch.Generator(device=device).manual_seed(seed)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif ".ln_" in name or name.startswith("ln_"):
                param.fill_(1.0)
            else:
                std = residual_std if name.endswith("proj.weight") else 0.02
                if on_host:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
                else:
                    param.normal_(0.0, std, generator=generator)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape != targets.shape:
            raise ValueError(f"tokens and targets must both be (batch, seq); got "
                             f"{tuple(tokens.shape)} and {tuple(targets.shape)}")
        seq = tokens.shape[1]
        if seq > self.config.block_size:
            raise ValueError(f"sequence length {seq} exceeds block_size "
                             f"{self.config.block_size}; shorten --seq-len")
        positions = torch.arange(seq, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_final(x), self.token_embedding.weight)  # tied LM head
        # Loss in fp32 whatever the model's dtype: bf16 log-softmax over the vocab is too coarse.
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


class MarkovTokenStream:
    """Tokens from a fixed random Markov chain in which each token has `branching` successors.

    The chain is a function of `seed`; the global batch of a step is a function of the seed and
    the step only, so any split of it into ranks and micro-batches, each taking its own rows,
    trains on the same data as one rank taking all of them at once.
    """

    def __init__(self, vocab_size: int, seed: int, branching: int = 4) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        if not 1 <= branching <= vocab_size:
            raise ValueError(f"branching must be in [1, vocab_size], got {branching}")
        self.vocab_size = vocab_size
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.successors = torch.randint(0, vocab_size, (vocab_size, branching),
                                        generator=generator)
        # Exponential weights = Dirichlet(1) rows: some successors likely, some rare.
        weights = -torch.log(torch.rand(vocab_size, branching, generator=generator))
        self.probabilities = weights / weights.sum(dim=1, keepdim=True)
        self.cumulative = self.probabilities.cumsum(dim=1)

    def entropy_floor(self, iterations: int = 200) -> float:
        """Approximate lowest reachable loss (nats): the row entropies weighted by the chain's
        stationary distribution, found by averaged power iteration."""
        row_entropy = -(self.probabilities * self.probabilities.clamp_min(1e-12).log()).sum(1)
        dist = torch.full((self.vocab_size,), 1.0 / self.vocab_size, dtype=torch.float64)
        average = torch.zeros_like(dist)
        flow_to = self.successors.reshape(-1)
        for _ in range(iterations):
            flow = (dist[:, None] * self.probabilities.double()).reshape(-1)
            dist = torch.zeros_like(dist).index_add_(0, flow_to, flow)
            average += dist
        average /= average.sum()
        return float((average * row_entropy.double()).sum())

    def batch(self, step: int, global_batch: int, seq_len: int,
              rows: slice) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rows `rows` of step `step`'s global batch: (inputs, targets), each
        (len(rows), seq_len) int64 on CPU."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if global_batch <= 0 or seq_len <= 0:
            raise ValueError("global_batch and seq_len must be positive")
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2 ** 63))
        uniforms = torch.rand(global_batch, seq_len + 1, generator=generator)[rows]
        if uniforms.shape[0] == 0:
            raise ValueError(f"rows {rows} select nothing from a global batch of {global_batch}")
        tokens = torch.empty(uniforms.shape, dtype=torch.long)
        tokens[:, 0] = (uniforms[:, 0] * self.vocab_size).long().clamp_(max=self.vocab_size - 1)
        last_choice = self.successors.shape[1] - 1
        for t in range(1, seq_len + 1):
            current = tokens[:, t - 1]
            passed = uniforms[:, t:t + 1] > self.cumulative[current]  # inverse-CDF sampling
            choice = passed.sum(1).clamp_(max=last_choice)
            tokens[:, t] = self.successors[current, choice]
        return tokens[:, :-1], tokens[:, 1:]
