"""Model shapes for the estimator: the element count of each trainable tensor of a model that
has not been built, in the order torch registers the parameters.

Owns: the GPT-2 and Llama parameter lists (as Hugging Face's GPT2LMHeadModel and
LlamaForCausalLM register them, a tied output head counted once), the named presets, reading an
HF `config.json`, and the uniform split used for a bare parameter count. Knows nothing of
ZeRO or bytes.

[Note: units] Stage 3 gathers parameters unit by unit. The `*_units` functions give, parallel to
the numels, each tensor's unit as the optimizer's default finds it (param_units.find_units and
owning_units): the blocks are the children of an nn.ModuleList (GPT-2's `transformer.h.<i>`,
Llama's `model.layers.<i>`), unit i+1 for block i; everything else (embeddings, final norm, an
untied head; a tied head is the embedding's tensor) is the root unit 0. A bare parameter count
has no blocks: `uniform_units` assumes each tensor of the uniform split is a unit of its own
(root empty), the smallest units such a count allows. Frozen parameters given as a bare count
beside a model (the estimator's --frozen) are split the same way, each tensor a unit of its own
numbered after the model's (`units_after`): a real model's frozen weights share its blocks.
"""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional, Tuple

# A bare parameter count is split into tensors of at most this many elements (a 4096x4096
# weight). The layout pads each tensor by less than 128 bytes, so for a model of millions of
# parameters or more, how the count is split changes the estimate by a negligible amount.
UNIFORM_TENSOR_NUMEL = 4096 * 4096

GPT2_KEYS = ("n_layer", "n_embd", "vocab_size", "n_positions")
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "vocab_size")


def gpt2_numels(*, n_layer: int, n_embd: int, vocab_size: int, n_positions: int,
                n_inner: Optional[int] = None, tie_word_embeddings: bool = True) -> List[int]:
    """GPT2LMHeadModel: token and position embeddings, per block LayerNorm / attention (fused
    qkv) / LayerNorm / MLP, all with biases, a final LayerNorm; the head shares wte's weight."""
    return _gpt2(n_layer=n_layer, n_embd=n_embd, vocab_size=vocab_size, n_positions=n_positions,
                 n_inner=n_inner, tie_word_embeddings=tie_word_embeddings)[0]


def gpt2_units(**shape) -> List[int]:
    """gpt2_numels' tensors' stage-3 units (gpt2_numels' keywords): `transformer.h.<i>` is unit
    i+1, wte / wpe / ln_f / an untied lm_head the root 0. See [Note: units]."""
    return _gpt2(**shape)[1]


def _gpt2(*, n_layer: int, n_embd: int, vocab_size: int, n_positions: int,
          n_inner: Optional[int] = None, tie_word_embeddings: bool = True
          ) -> Tuple[List[int], List[int]]:
    d = n_embd
    inner = n_inner or 4 * d
    numels = [vocab_size * d, n_positions * d]
    units = [0, 0]
    for i in range(n_layer):
        block = [d, d,                      # ln_1
                 d * 3 * d, 3 * d,          # attn.c_attn
                 d * d, d,                  # attn.c_proj
                 d, d,                      # ln_2
                 d * inner, inner,          # mlp.c_fc
                 inner * d, d]              # mlp.c_proj
        numels += block
        units += [i + 1] * len(block)
    numels += [d, d]                        # ln_f
    units += [0, 0]
    if not tie_word_embeddings:
        numels.append(vocab_size * d)       # lm_head (no bias)
        units.append(0)
    return numels, units


def llama_numels(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                 num_attention_heads: int, vocab_size: int,
                 num_key_value_heads: Optional[int] = None, tie_word_embeddings: bool = False,
                 head_dim: Optional[int] = None, attention_bias: bool = False,
                 mlp_bias: bool = False) -> List[int]:
    """LlamaForCausalLM: embeddings, per layer q/k/v/o projections (k and v sized by the
    key-value heads), gate/up/down MLP, two RMSNorm weights; a final RMSNorm; an untied head
    unless tie_word_embeddings."""
    return _llama(hidden_size=hidden_size, intermediate_size=intermediate_size,
                  num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                  vocab_size=vocab_size, num_key_value_heads=num_key_value_heads,
                  tie_word_embeddings=tie_word_embeddings, head_dim=head_dim,
                  attention_bias=attention_bias, mlp_bias=mlp_bias)[0]


def llama_units(**shape) -> List[int]:
    """llama_numels' tensors' stage-3 units (llama_numels' keywords): `model.layers.<i>` is unit
    i+1, embed_tokens / norm / an untied lm_head the root 0. See [Note: units]."""
    return _llama(**shape)[1]


def _llama(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
           num_attention_heads: int, vocab_size: int, num_key_value_heads: Optional[int] = None,
           tie_word_embeddings: bool = False, head_dim: Optional[int] = None,
           attention_bias: bool = False, mlp_bias: bool = False
           ) -> Tuple[List[int], List[int]]:
    d, inner = hidden_size, intermediate_size
    head_dim = head_dim or d // num_attention_heads
    q_dim = num_attention_heads * head_dim
    kv_dim = (num_key_value_heads or num_attention_heads) * head_dim
    numels = [vocab_size * d]
    units = [0]
    for i in range(num_hidden_layers):
        attention = [d * q_dim, d * kv_dim, d * kv_dim]
        if attention_bias:
            attention = [attention[0], q_dim, attention[1], kv_dim, attention[2], kv_dim]
        attention += [q_dim * d] + ([d] if attention_bias else [])
        mlp = ([d * inner, inner, d * inner, inner, inner * d, d] if mlp_bias
               else [d * inner, d * inner, inner * d])
        layer = attention + mlp + [d, d]    # input_layernorm, post_attention_layernorm
        numels += layer
        units += [i + 1] * len(layer)
    numels.append(d)                        # norm
    units.append(0)
    if not tie_word_embeddings:
        numels.append(vocab_size * d)       # lm_head
        units.append(0)
    return numels, units


PRESETS: Dict[str, Dict[str, Any]] = {
    "gpt2": dict(family="gpt2", n_layer=12, n_embd=768, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(family="gpt2", n_layer=24, n_embd=1024, vocab_size=50257,
                        n_positions=1024),
    "gpt2-large": dict(family="gpt2", n_layer=36, n_embd=1280, vocab_size=50257,
                       n_positions=1024),
    "gpt2-xl": dict(family="gpt2", n_layer=48, n_embd=1600, vocab_size=50257, n_positions=1024),
    # LLaMA-7B's published shapes (32000-token vocabulary, untied head): 6,738,415,616 params.
    "llama-7b-like": dict(family="llama", hidden_size=4096, intermediate_size=11008,
                          num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                          vocab_size=32000, tie_word_embeddings=False),
}


def _model_of_family(settings: Dict[str, Any]) -> Tuple[List[int], List[int]]:
    settings = dict(settings)
    family = settings.pop("family")
    return _gpt2(**settings) if family == "gpt2" else _llama(**settings)


def preset_numels(name: str) -> List[int]:
    return preset_model(name)[0]


def preset_units(name: str) -> List[int]:
    """The stage-3 unit of each of preset_numels(name)'s tensors (see [Note: units])."""
    return preset_model(name)[1]


def preset_model(name: str) -> Tuple[List[int], List[int]]:
    """(numels, units) of a preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return _model_of_family(PRESETS[name])


def config_numels(config: Dict[str, Any]) -> Tuple[str, List[int]]:
    """(family, numels) of a Hugging Face config (the dict of its config.json)."""
    family, numels, _ = config_model(config)
    return family, numels


def config_model(config: Dict[str, Any]) -> Tuple[str, List[int], List[int]]:
    """(family, numels, units) of a Hugging Face config (see [Note: units])."""
    gpt2_like = config.get("model_type") == "gpt2" or "n_embd" in config
    if gpt2_like:
        family, required = "gpt2", GPT2_KEYS
    elif "hidden_size" in config or config.get("model_type") == "llama":
        family, required = "llama", LLAMA_KEYS
    else:
        raise ValueError(
            "config has neither GPT-2 keys (" + ", ".join(GPT2_KEYS) + ") nor Llama keys ("
            + ", ".join(LLAMA_KEYS) + ")")
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise ValueError(f"{family}-style config lacks {', '.join(missing)}")
    if family == "gpt2":
        return (family,) + _gpt2(
            **{k: int(config[k]) for k in GPT2_KEYS}, n_inner=config.get("n_inner"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", True)))
    optional = {k: config[k] for k in ("num_key_value_heads", "head_dim") if config.get(k)}
    return (family,) + _llama(
        **{k: int(config[k]) for k in LLAMA_KEYS}, **{k: int(v) for k, v in optional.items()},
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)),
        mlp_bias=bool(config.get("mlp_bias", False)))


def read_config_numels(path: str) -> Tuple[str, List[int]]:
    family, numels, _ = read_config_model(path)
    return family, numels


def read_config_model(path: str) -> Tuple[str, List[int], List[int]]:
    """(family, numels, units) of a config.json file."""
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object")
    try:
        return config_model(config)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def uniform_numels(num_params: int) -> List[int]:
    """`num_params` split into equal tensors of at most UNIFORM_TENSOR_NUMEL elements."""
    if num_params < 1:
        raise ValueError(f"a model needs at least one parameter, got {num_params}")
    count = math.ceil(num_params / UNIFORM_TENSOR_NUMEL)
    base, extra = divmod(num_params, count)
    return [base + 1] * extra + [base] * (count - extra)


def uniform_units(num_params: int) -> List[int]:
    """The units assumed for uniform_numels(num_params) at stage 3: each tensor a unit of its own
    (1, 2, ...), nothing in the root (see [Note: units])."""
    return list(range(1, len(uniform_numels(num_params)) + 1))


def units_after(units: List[int], count: int) -> List[int]:
    """`count` tensors each a unit of its own, numbered after the largest of `units` (frozen
    tensors beside a model; see [Note: units])."""
    first = max(units, default=0) + 1
    return list(range(first, first + count))
