"""herd's C++ decode step for CPU (csrc/decode_step.cpp): a step of decodes in one call.

At batch 1 a decode step is ~300 small ops; torch.compile's graph still pays guards, input
preparation and a Python wrapper per step, and the eager model a dispatch per op. The C++ step
runs the layer loop, norms, RoPE, KV writes and paged attention itself and hands only the
projections to GEMM kernels: torch's for float32 and bfloat16 weights, and for int4 and int8
weights herd's own (csrc/vnni_matmul.cpp: int8 activations in AVX-512 VNNI dot products) where
the CPU has VNNI, else torch's weight-only ones. It covers dense models
in float32 or bfloat16, int4-quantized or not; a bfloat16 model rounds where its eager ops
round. Everything else (MoE layers, sharded layers, other dtypes), every step with a prefill
chunk longer than one token and every step whose sequences share a long cached prefix
(`shares_prefix`) runs the model's Python forward.

The extension is built on first use with torch's C++ extension builder (about a minute;
cached under ~/.cache/torch_extensions, rebuilt when the source changes).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from kernels.int4_linear import Int4Linear
from kernels.int8_linear import Int8Linear
from models.llama4.model import MLP, Llama4Model
from serving.engine.cpu_gemm import Float32GemmLinear
from serving.engine.decode_attention import CASCADE_MIN_TOKENS, shared_prefix_blocks
from serving.engine.paged_attention import SeqSlice

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).parent / "csrc" / name for name in ("decode_step.cpp", "vnni_matmul.cpp")]
DENSE, INT4, INT8, INT4_VNNI, INT8_VNNI = 0, 1, 2, 3, 4
VNNI_GROUP, VNNI_ROWS = 32, 16  # vnni_matmul.h's kQuantGroup and kRows
DTYPES = (torch.float32, torch.bfloat16)
PROFILE_NAME = "herd::decode_step"


def unsupported_reason(model: Llama4Model) -> str | None:
    """Why the C++ step cannot run this model, or None when it can."""
    p = model.embed_tokens.weight
    if p.device.type != "cpu":
        return f"the model is on {p.device.type}"
    if p.dtype not in DTYPES:
        return f"activations are {p.dtype} (the C++ step runs float32 and bfloat16 models)"
    if type(model.embed_tokens) is not nn.Embedding:
        return "the embedding is sharded"
    for i, layer in enumerate(model.layers):
        if type(layer.feed_forward) is not MLP:
            return f"layer {i} is a mixture of experts"
        attn, mlp = layer.self_attn, layer.feed_forward
        for name, lin in (("qkv_proj", attn.qkv_proj), ("o_proj", attn.o_proj),
                          ("gate_up_proj", mlp.gate_up_proj), ("down_proj", mlp.down_proj)):
            if _linear_kind(lin, p.dtype) is None:
                return f"layer {i}'s {name} is a {type(lin).__name__}"
        if layer.input_layernorm.eps != model.norm.eps or layer.post_attention_layernorm.eps != model.norm.eps:
            return f"layer {i}'s norms have their own eps"
    return None


def _linear_kind(lin: nn.Module, dtype: torch.dtype) -> int | None:
    dense = type(lin) is Float32GemmLinear or (type(lin) is nn.Linear and lin.bias is None)
    if dense and lin.weight.dtype == dtype:
        return DENSE
    if type(lin) is Int4Linear:
        return INT4
    if type(lin) is Int8Linear:
        return INT8
    return None


@functools.cache
def extension():
    """Builds (once per source version) and imports the C++ extension."""
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # pip's ninja sits beside this interpreter, maybe not on PATH
        os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")
    capability = torch.backends.cpu.get_cpu_capability()
    vector = {"AVX2": ["-mavx2", "-mfma"],
              "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mprefer-vector-width=512"]}.get(capability, [])
    log.info("building herd's C++ decode step (once; about a minute)")
    return cpp_extension.load(name=f"herd_decode_step_{capability.lower()}", sources=[str(p) for p in SOURCES],
                              extra_cflags=["-O3", "-fopenmp", *vector], extra_ldflags=["-fopenmp"])


class NativeDecode:
    """The model's decode step over the engine's paged KV cache (its tensors, shared)."""

    def __init__(self, model: Llama4Model, k_caches: list[torch.Tensor], v_caches: list[torch.Tensor],
                 block_size: int, vnni: bool = True) -> None:
        """Where the CPU has AVX-512 VNNI, the model's int4 and int8 layers run in herd's VNNI
        kernels from here on, in this step and in the model's own forward (prefill) alike, so
        that a sequence recomputed after preemption gets back the KV it had. `vnni=False` puts
        them back on torch's weight-only kernels (whose bf16 activations round differently)."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the C++ decode step cannot run this model: {reason}")
        ext = extension()
        use_vnni_kernels(model, vnni)
        c = model.config
        a0 = model.layers[0].self_attn
        self.block_size = block_size
        self.dtype = model.embed_tokens.weight.dtype
        self.step = ext.DecodeStep(model.embed_tokens.weight.detach().contiguous(),
                                   model.norm.weight.detach().float().contiguous(),
                                   model.inv_freq.float().contiguous(), float(model.norm.eps), a0.n_heads,
                                   a0.n_kv, a0.head_dim, float(a0.scale), bool(c.rope_interleaved))
        for layer, kc, vc in zip(model.layers, k_caches, v_caches, strict=True):
            attn, mlp = layer.self_attn, layer.feed_forward
            linears = [_native_linear(ext, lin, self.dtype)
                       for lin in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            floor_scale, attn_scale = attn.temperature or (1.0, 0.0)
            self.step.add_layer(layer.input_layernorm.weight.detach().float().contiguous(),
                                layer.post_attention_layernorm.weight.detach().float().contiguous(), kc, vc,
                                linears, attn.use_rope,
                                -1.0 if attn.qk_norm_eps is None else float(attn.qk_norm_eps),
                                attn.temperature is not None, float(floor_scale), float(attn_scale),
                                attn.chunk_size or 0)

    def __call__(self, ids: list[int], slices: list[SeqSlice]) -> torch.Tensor:
        """One token per sequence (its slice: position context_len - 1) -> hidden (B, D)."""
        bs = self.block_size
        positions = [s.context_len - 1 for s in slices]
        used = [p // bs + 1 for p in positions]
        width = max(used)
        table = torch.tensor([s.block_table[:n] + [0] * (width - n) for s, n in zip(slices, used)],
                             dtype=torch.long)
        slots = torch.tensor([s.block_table[p // bs] * bs + p % bs for s, p in zip(slices, positions)],
                             dtype=torch.long)
        with torch.profiler.record_function(PROFILE_NAME):  # its self time: the C++ outside ATen ops
            return self.step.forward(torch.tensor(ids, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                                     slots, table)


def shares_prefix(slices: list[SeqSlice], block_size: int) -> bool:
    """Whether some sequences form a cascade group (decode_attention's rule: the same first
    block and a shared prefix of at least CASCADE_MIN_TOKENS). Such steps run the Python decode
    path, whose cascade reads the prefix once for the group in batched GEMMs: measured faster
    there than the C++ step reading it per sequence (see the 2026-11-30 prefix-64x64 results)."""
    by_first: dict[int, list[SeqSlice]] = defaultdict(list)
    for s in slices:
        by_first[s.block_table[0]].append(s)
    return any(shared_prefix_blocks(members, block_size) * block_size >= CASCADE_MIN_TOKENS
               for members in by_first.values())


def use_vnni_kernels(model: nn.Module, on: bool = True) -> int:
    """Hands the model's Int4Linear and Int8Linear layers whose shapes they take to herd's VNNI
    kernels (on a CPU with AVX-512 VNNI; the kernels then hold the weights, in their layout), or
    back to torch's; returns how many layers run in them."""
    ext = extension()
    count = 0
    for lin in model.modules():
        if type(lin) not in (Int4Linear, Int8Linear):
            continue
        if not on:
            lin.detach()
        elif lin.fast is None and ext.vnni_supported() and (fast := _vnni_kernel(ext, lin)) is not None:
            lin.attach(fast)
        count += lin.fast is not None
    return count


class _Vnni:
    linear: object  # the extension's Linear

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class VnniInt4(_Vnni):
    """Int4Linear's fast kernel: (M, K) float32 -> (M, N) float32 over the codes in the layout of
    vnni_matmul.h, [N / 16][K / 32][4][64] bytes: the byte for row r, input 8 c + j of a group
    holds that code low and the code of input 8 c + 4 + j high, so that one 64-byte load feeds
    16 rows x 4 inputs to each of two vpdpbusd. Scales and zeros stay the layer's own."""

    def __init__(self, ext, lin: Int4Linear) -> None:
        N, K = lin.out_features, lin.in_features
        # codes[rb, r, g, c, h, j] -> [rb, g, c, r, j, h]
        c = lin.codes().view(N // VNNI_ROWS, VNNI_ROWS, K // VNNI_GROUP, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)
        self.weight = (c[..., 0] | (c[..., 1] << 4)).reshape(N // VNNI_ROWS, K // VNNI_GROUP, 4, 64).contiguous()
        self.linear = ext.Linear(INT4_VNNI, self.weight, _bf16_scales(lin), lin.group_size)

    def codes(self) -> torch.Tensor:
        rb, G = self.weight.shape[:2]
        b = self.weight.view(rb, G, 4, VNNI_ROWS, 4)
        c = torch.stack([b & 15, b >> 4], dim=-1)  # [rb, g, c, r, j, h] -> [rb, r, g, c, h, j]
        return c.permute(0, 3, 1, 2, 5, 4).reshape(rb * VNNI_ROWS, G * VNNI_GROUP)


class VnniInt8(_Vnni):
    """Int8Linear's fast kernel over the weights as [N / 16][K / 4][16][4] (vnni_matmul.h)."""

    def __init__(self, ext, lin: Int8Linear) -> None:
        N, K = lin.out_features, lin.in_features
        self.weight = lin.codes().view(N // VNNI_ROWS, VNNI_ROWS, K // 4, 4).transpose(1, 2).contiguous()
        self.linear = ext.Linear(INT8_VNNI, self.weight, _bf16_scales(lin), 0)

    def codes(self) -> torch.Tensor:
        rb, k4 = self.weight.shape[:2]
        return self.weight.transpose(1, 2).reshape(rb * VNNI_ROWS, k4 * 4)


def _vnni_kernel(ext, lin: Int4Linear | Int8Linear) -> VnniInt4 | VnniInt8 | None:
    """The VNNI kernel for the layer, or None where its shape does not suit (rows in 16s,
    inputs in groups of 32)."""
    if lin.out_features % VNNI_ROWS:
        return None
    if type(lin) is Int4Linear and lin.group_size % VNNI_GROUP == 0:
        return VnniInt4(ext, lin)
    if type(lin) is Int8Linear and lin.in_features % VNNI_GROUP == 0:
        return VnniInt8(ext, lin)
    return None


def _native_linear(ext, lin: nn.Module, dtype: torch.dtype):
    kind = _linear_kind(lin, dtype)
    if kind in (INT4, INT8) and lin.fast is not None:
        return lin.fast.linear
    if kind == INT4:
        return ext.Linear(INT4, lin.packed, _bf16_scales(lin), lin.group_size)
    if kind == INT8:
        return ext.Linear(INT8, lin.weight_int8, _bf16_scales(lin), 0)
    if type(lin) is Float32GemmLinear:
        return ext.Linear(DENSE, lin.weight.detach(), lin.weight_f32, lin.min_rows)
    return ext.Linear(DENSE, lin.weight.detach(), torch.empty(0), 0)


def _bf16_scales(lin: Int4Linear | Int8Linear) -> torch.Tensor:
    """The layer's scales (int4: with zeros) as its kernels read them, bfloat16 (recast in place
    if a model.to(dtype) changed them)."""
    attr = "scales_zeros" if type(lin) is Int4Linear else "scales"
    if getattr(lin, attr).dtype != torch.bfloat16:
        setattr(lin, attr, getattr(lin, attr).to(torch.bfloat16))
    return getattr(lin, attr)
