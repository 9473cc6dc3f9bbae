"""Paged decode attention: the Triton kernel (interpreted on CPU) against the gather-and-softmax
reference and against the engine's CPU path on the same cache.

Every cache slot no query may see holds NaN, so a kernel that reads past a context, before a
chunk's start or through a hole (-1) in the table turns its output into NaN.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.paged_attention_triton as pat
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
from serving.engine.paged_attention import PagedAttention, SeqSlice

BS = 8  # tokens per cache block
SCALE = 0.3
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 2e-2, "rtol": 2e-2}}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _case(ctx_lens: list[int], K: int, G: int, dtype=torch.float32, chunk: int | None = None, d: int = 32,
          seed: int = 0, extra_cols: int = 2):
    """A cache whose only finite slots are the visible keys, blocks in shuffled order, tables with
    -1 past each sequence's end and (chunked) for every block wholly before its chunk."""
    g = torch.Generator().manual_seed(seed)
    B = len(ctx_lens)
    used = [_cdiv(c, BS) for c in ctx_lens]
    N = sum(used) + 3  # a few blocks nobody owns
    ids = iter(torch.randperm(N, generator=g).tolist())
    M = max(used, default=0) + extra_cols
    table = torch.full((B, M), -1, dtype=torch.int32)
    k = torch.full((N, BS, K, d), float("nan"))
    v = torch.full((N, BS, K, d), float("nan"))
    for b, ctx in enumerate(ctx_lens):
        lo = (ctx - 1) // chunk * chunk if chunk and ctx else 0
        for j in range(used[b]):
            blk = next(ids)
            if (j + 1) * BS <= lo:
                continue  # a hole: this block id is still consumed so ids stay scattered
            table[b, j] = blk
            for slot in range(BS):
                if lo <= j * BS + slot < ctx:
                    k[blk, slot] = torch.randn(K, d, generator=g)
                    v[blk, slot] = torch.randn(K, d, generator=g)
    q = torch.randn(B, K * G, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), table, torch.tensor(ctx_lens, dtype=torch.int32)


def _compare(case, chunk=None, temperature=None):
    q, k, v, table, ctx = case
    got = paged_decode_attention(q, k, v, table, ctx, SCALE, chunk, temperature)
    want = paged_decode_attention_reference(q, k, v, table, ctx, SCALE, chunk, temperature)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert not want.isnan().any()  # the reference itself only touched visible keys
    torch.testing.assert_close(got, want, **TOL[q.dtype])
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G", [1, 4, 8])
@pytest.mark.parametrize("chunk", [None, 12])
def test_matches_reference(triton_kernels, dtype, G, chunk):
    # A block exactly, a block + 1, short, several blocks; chunk 12 starts chunks mid-block.
    _compare(_case([BS, BS + 1, 5, 3 * BS + 7, 45], K=2, G=G, dtype=dtype, chunk=chunk), chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_of_context(triton_kernels, dtype):
    case = _case([1], K=2, G=4, dtype=dtype)
    v, table = case[2], case[3]
    for chunk, temperature in ((None, None), (4, (2.0, 0.5))):
        got = _compare(case, chunk, temperature)
        # The only key gets all the weight: each head returns its kv head's value row.
        want = v[table[0, 0], 0].repeat_interleave(4, dim=0)
        torch.testing.assert_close(got[0], want, **TOL[dtype])


def test_temperature_is_llama4_query_scaling(triton_kernels):
    q, k, v, table, ctx = case = _case([3, 17, 40, 61], K=2, G=4)
    temperature = (4.0, 0.1)
    got = _compare(case, None, temperature)
    # Attention.forward's formula applied to q outside the kernel gives the same attention.
    pos = ctx.long() - 1
    t = torch.log1p(torch.floor((pos.float() + 1.0) / temperature[0])) * temperature[1] + 1.0
    prescaled = paged_decode_attention_reference(q * t[:, None, None], k, v, table, ctx, SCALE)
    torch.testing.assert_close(got, prescaled, **TOL[torch.float32])
    assert not torch.allclose(got, paged_decode_attention(q, k, v, table, ctx, SCALE), atol=1e-3)


def test_chunked_with_temperature(triton_kernels):
    _compare(_case([7, 16, 17, 33, 50], K=1, G=8, chunk=16), 16, (4.0, 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_context_uses_several_partitions(triton_kernels, dtype):
    ctx_lens = [700, 3, 300]  # the short ones leave most partitions empty
    case = _case(ctx_lens, K=1, G=8, dtype=dtype)
    partitions, _ = pat.plan_partitions(case[3].shape[1] * BS, len(ctx_lens), case[0].device)
    assert partitions >= 2
    _compare(case)


def test_chunked_long_context_partitions_the_chunk(triton_kernels):
    # Chunk 512 at position 999 sees 512..999; the 64 blocks before it are holes.
    case = _case([1000], K=1, G=4, chunk=512)
    assert pat.plan_partitions(512, 1, case[0].device)[0] == 2
    _compare(case, 512)


def test_more_partitions_than_one_merge_step(triton_kernels, monkeypatch):
    monkeypatch.setattr(pat, "MIN_PARTITION_TILES", 1)
    monkeypatch.setattr(pat, "INTERPRETER_SMS", 32)
    case = _case([1100, 65], K=1, G=4, extra_cols=0)
    assert pat.plan_partitions(case[3].shape[1] * BS, 2, case[0].device)[0] > pat.BLOCK_P
    _compare(case)


@pytest.mark.parametrize("mode", ["triton_kernels", "reference_kernels"])
def test_padding_row_gets_zeros(mode, request):
    request.getfixturevalue(mode)
    got = _compare(_case([9, 0, 20], K=2, G=4))
    assert torch.equal(got[1], torch.zeros_like(got[1]))


@pytest.mark.parametrize("mode", ["triton_kernels", "reference_kernels"])
@pytest.mark.parametrize("chunk, temperature", [(None, None), (16, None), (None, (4.0, 0.1))])
def test_matches_engine_cpu_path(mode, request, chunk, temperature):
    """The engine writes this step's k/v into its cache and attends; the kernel reads that same
    cache through int32 tables padded with -1 and must agree, so the layouts provably match."""
    request.getfixturevalue(mode)
    K, G, d = 2, 4, 16
    g = torch.Generator().manual_seed(3)
    num_blocks = 24
    kc = [torch.randn(num_blocks + 1, BS, K, d, generator=g)]
    vc = [torch.randn(num_blocks + 1, BS, K, d, generator=g)]
    kc[0][-1] = vc[0][-1] = 0  # the engine's pad block
    ids = iter(torch.randperm(num_blocks, generator=g).tolist())
    ctx_lens = [2, BS, BS + 1, 30, 41]
    seqs = [SeqSlice(i, 1, c, [next(ids) for _ in range(_cdiv(c, BS))]) for i, c in enumerate(ctx_lens)]
    pos = torch.tensor([c - 1 for c in ctx_lens])
    B = len(seqs)
    q = torch.randn(B, K * G, d, generator=g)
    k_new, v_new = torch.randn(B, K, d, generator=g), torch.randn(B, K, d, generator=g)
    q_engine = q
    if temperature is not None:  # the model scales q before attend (Attention.forward)
        t = torch.log1p(torch.floor((pos.float() + 1.0) / temperature[0])) * temperature[1] + 1.0
        q_engine = (q * t[:, None, None]).to(q.dtype)
    want = PagedAttention(kc, vc, BS, seqs, pos, num_blocks).attend(0, q_engine, k_new, v_new, chunk, SCALE)
    table = torch.full((B, max(len(s.block_table) for s in seqs) + 1), -1, dtype=torch.int32)
    for b, s in enumerate(seqs):
        table[b, :len(s.block_table)] = torch.tensor(s.block_table)
    got = paged_decode_attention(q, kc[0], vc[0], table, torch.tensor(ctx_lens, dtype=torch.int32), SCALE,
                                 chunk, temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _bad_inputs():
    q, k, v, table, ctx = _case([5, 12], K=2, G=4)
    base = {"q_BHd": q, "k_cache_NSKd": k, "v_cache_NSKd": v, "block_tables_BM": table, "context_lens_B": ctx,
            "scale": SCALE}
    hole = table.clone()
    hole[1, 1] = -1
    far = table.clone()
    far[0, 0] = k.shape[0]
    cases = [
        ("q_BHd", {"q_BHd": q[0]}),
        ("q_BHd", {"q_BHd": q.to(torch.int32)}),
        ("q_BHd", {"q_BHd": torch.randn(2, 8, 64)[..., ::2]}),
        ("k_cache_NSKd", {"k_cache_NSKd": k[0]}),
        ("k_cache_NSKd", {"k_cache_NSKd": k[..., :16]}),
        ("k_cache_NSKd", {"q_BHd": torch.randn(2, 5, 32)}),
        ("k_cache_NSKd", {"k_cache_NSKd": k.double()}),
        ("v_cache_NSKd", {"v_cache_NSKd": v[:, :4]}),
        ("v_cache_NSKd", {"v_cache_NSKd": v.bfloat16()}),
        ("block_tables_BM", {"block_tables_BM": table.long()}),
        ("block_tables_BM", {"block_tables_BM": table[:1]}),
        ("block_tables_BM", {"block_tables_BM": hole}),
        ("block_tables_BM", {"block_tables_BM": far}),
        ("context_lens_B", {"context_lens_B": ctx.long()}),
        ("context_lens_B", {"context_lens_B": ctx[:1]}),
        ("context_lens_B", {"context_lens_B": torch.tensor([5, -1], dtype=torch.int32)}),
        ("context_lens_B", {"context_lens_B": torch.tensor([5, table.shape[1] * BS + 1], dtype=torch.int32)}),
        ("scale", {"scale": float("nan")}),
        ("chunk_size", {"chunk_size": 0}),
        ("temperature", {"temperature": (0.0, 0.1)}),
        ("temperature", {"temperature": 3.0}),
    ]
    return [pytest.param(base, name, change, id=f"{name}-{i}") for i, (name, change) in enumerate(cases)]


@pytest.mark.parametrize("base, name, change", _bad_inputs())
def test_bad_input_names_the_argument(triton_kernels, base, name, change):
    with pytest.raises(ValueError, match=name):
        paged_decode_attention(**{**base, **change})


def test_cpu_default_is_the_reference_without_triton():
    code = ("import sys, torch\n"
            "from kernels.paged_attention import paged_decode_attention\n"
            "q, kv = torch.randn(1, 4, 16), torch.randn(2, 8, 2, 16)\n"
            "paged_decode_attention(q, kv, kv, torch.tensor([[1]], dtype=torch.int32),\n"
            "                       torch.tensor([3], dtype=torch.int32), 0.25)\n"
            "assert 'kernels.paged_attention_triton' not in sys.modules and 'triton' not in sys.modules\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HERD_KERNELS", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk, temperature", [(None, None), (8192, None), (None, (8192.0, 0.1))])
def test_llama4_shapes_on_gpu(triton_kernels, dtype, chunk, temperature):
    # Scout's attention (40 heads, 8 kv heads, d 128): batch 1 with a long context, then a mixed batch.
    for ctx_lens in ([20000], [1, 16, 17, 3000, 9000]):
        q, k, v, table, ctx = _case(ctx_lens, K=8, G=5, dtype=dtype, chunk=chunk, d=128)
        q, k, v, table, ctx = (t.cuda() for t in (q, k, v, table, ctx))
        got = paged_decode_attention(q, k, v, table, ctx, 128 ** -0.5, chunk, temperature)
        want = paged_decode_attention_reference(q, k, v, table, ctx, 128 ** -0.5, chunk, temperature)
        tol = TOL[dtype] if dtype != torch.float32 else {"atol": 1e-4, "rtol": 1e-4}  # longer fp32 sums
        torch.testing.assert_close(got, want, **tol)
