"""The one table that maps checkpoint tensors (HF names) to module parameters, both ways.

A module parameter is built from one or more checkpoint tensors concatenated along dim 0
(q/k/v -> qkv_proj, gate/up -> gate_up_proj). Loading is strict: a checkpoint tensor the
table does not name, a tensor it names that is missing, or a shape that differs is an error
naming that tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from models.errors import CheckpointError
from models.llama4.config import ModelConfig


class TensorSource(Protocol):
    def names(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def get_part(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...
    def origin(self, name: str) -> str: ...


@dataclass(frozen=True)
class Entry:
    param: str  # module parameter name
    sources: tuple[str, ...]  # checkpoint names, concatenated along dim 0 in this order
    rows: tuple[int, ...]  # dim-0 size of each source


# (module parameter, [(checkpoint suffix, rows)]) per layer kind; {ffn} is "mlp" for dense
# Llama and "feed_forward" for Llama 4; rows are functions of the config.
def _attention(c: ModelConfig):
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return [("self_attn.qkv_proj.weight", [("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                           ("self_attn.v_proj.weight", kv)]),
            ("self_attn.o_proj.weight", [("self_attn.o_proj.weight", c.hidden_size)]),
            ("input_layernorm.weight", [("input_layernorm.weight", c.hidden_size)]),
            ("post_attention_layernorm.weight", [("post_attention_layernorm.weight", c.hidden_size)])]


def _dense(width: int, hidden: int, ffn: str, ours: str = "feed_forward"):
    return [(f"{ours}.gate_up_proj.weight", [(f"{ffn}.gate_proj.weight", width), (f"{ffn}.up_proj.weight", width)]),
            (f"{ours}.down_proj.weight", [(f"{ffn}.down_proj.weight", hidden)])]


def _moe(c: ModelConfig):
    E, I, D = c.num_local_experts, c.intermediate_size, c.hidden_size
    return [("feed_forward.router.weight", [("feed_forward.router.weight", E)]),
            ("feed_forward.experts_gate_up", [("feed_forward.experts.gate_up_proj", E)]),
            ("feed_forward.experts_down", [("feed_forward.experts.down_proj", E)]),
            *_dense(I, D, "feed_forward.shared_expert", "feed_forward.shared_expert")]


def weight_table(c: ModelConfig) -> list[Entry]:
    pre = c.weight_prefix
    table = [Entry("embed_tokens.weight", (f"{pre}model.embed_tokens.weight",), (c.vocab_size,)),
             Entry("norm.weight", (f"{pre}model.norm.weight",), (c.hidden_size,))]
    if not c.tie_word_embeddings:
        table.append(Entry("lm_head.weight", (f"{pre}lm_head.weight",), (c.vocab_size,)))
    ffn = "feed_forward" if c.is_llama4 else "mlp"
    for i in range(c.num_hidden_layers):
        rows = _attention(c) + (_moe(c) if c.layer_is_moe(i) else _dense(c.mlp_width(i), c.hidden_size, ffn))
        for param, parts in rows:
            table.append(Entry(f"layers.{i}.{param}",
                               tuple(f"{pre}model.layers.{i}.{s}" for s, _ in parts),
                               tuple(n for _, n in parts)))
    return table


def _check_names(table: list[Entry], source: TensorSource, c: ModelConfig) -> None:
    expected = {s for e in table for s in e.sources}
    present = set(source.names())
    tolerated = {f"{c.weight_prefix}lm_head.weight"} if c.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - expected - tolerated
                        if not n.startswith(c.ignored_prefixes or ("\0",)))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"{source.origin(unexpected[0])}: unexpected tensor {unexpected[0]}"
                              f"{more} for {c.architecture}")
    missing = [s for e in table for s in e.sources if s not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]}{more}")


# param -> (dim, [(start, stop) in each of its sources, in table order], full size of dim when
# dim > 0): read only that slice of each checkpoint tensor (a tensor-parallel rank's shard).
Parts = dict[str, tuple[int, list[tuple[int, int]], int]]


def load_weights(model: nn.Module, source: TensorSource, parts: Parts | None = None,
                 take: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Fills every parameter of `model` from `source`, one checkpoint tensor at a time; the
    parameters named in `parts` from the slices it gives. A parameter still on `meta` is read
    into a fresh CPU tensor handed to `take(name, tensor)` instead (the loader quantizes such
    layers one at a time, never holding them all in float)."""
    c: ModelConfig = model.config
    table = weight_table(c)
    _check_names(table, source, c)
    params = dict(model.named_parameters())
    for e in table:
        param = params.pop(e.param)
        streamed = param.is_meta
        if streamed:
            if take is None:
                raise ValueError(f"load_weights: {e.param} is on meta and nothing takes it")
            param = torch.empty(param.shape, dtype=param.dtype)
        dim, ranges, full = (parts or {}).get(e.param, (0, None, 0))
        offset = 0
        for i, (name, rows) in enumerate(zip(e.sources, e.rows)):
            want = [rows, *param.shape[1:]]
            if dim > 0:
                want[dim] = full
            got = source.shape(name)
            if got != tuple(want):
                raise CheckpointError(f"{source.origin(name)}: tensor {name} has shape {list(got)}, "
                                      f"expected {want}")
            if ranges is None:
                value = source.get(name)
            else:
                value = source.get_part(name, dim, *ranges[i])
            n = value.shape[0]
            with torch.no_grad():
                param[offset:offset + n].copy_(value)
            offset += n
        if streamed:
            take(e.param, param)


def export_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of `model` by HF name (views split from the fused parameters)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for e in weight_table(model.config):
        for name, part in zip(e.sources, params[e.param].detach().split(list(e.rows), dim=0)):
            out[name] = part
    return out
