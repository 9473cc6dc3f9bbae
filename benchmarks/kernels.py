"""Each kernel of kernels/ at Llama 4 Scout shapes beside torch eager and torch.compile of its
reference, in one run: time, achieved GB/s and TFLOP/s, and their fraction of the device's limits.

    .venv/bin/python benchmarks/kernels.py [--only rms_norm,flash_attention] [--reps 20]

Scout: hidden 5120, 40 query heads, 8 KV heads, head_dim 128, 16 experts of width 8192, vocab 202048.
On CUDA "herd" is the Triton kernel (kernels.dispatch picks it). Without a GPU the shapes shrink by
--cpu-scale and "herd" is the wrapper's reference path: the Triton kernels only run interpreted on a
CPU, which measures nothing, so a CPU run checks the driver and shows eager vs compile only.
Targets (H100): memory-bound kernels >= 80% of the copy bandwidth measured in the same run; grouped
GEMM and prefill attention >= 60% of bf16 peak; paged decode attention >= SDPA over a contiguous cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
# This file's own folder comes after the project root: `kernels` must be the package, not this script.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.append(str(ROOT / "benchmarks"))

from report import fmt, md_table, write_results

H100_BYTES_S = 3.35e12  # HBM3
H100_BF16_FLOP_S = 989e12  # dense
SCOUT = {"D": 5120, "H": 40, "K": 8, "d": 128, "E": 16, "I": 8192, "V": 202048}


@dataclass
class Case:
    name: str
    bound: str  # "memory" or "compute": which limit the fraction is taken against
    nbytes: float
    flops: float
    herd: Callable[[], object]
    eager: Callable[[], object]
    compiled_fn: Callable | None = None  # the reference, for torch.compile
    compiled_args: tuple = ()
    peer_name: str = "torch eager (reference)"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def copy_bandwidth(device: str, dtype: torch.dtype, reps: int) -> float:
    n = (1 << 29 if device == "cuda" else 1 << 25) // 2
    src = torch.empty(n, dtype=dtype, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms / 1e3)


def cases(device: str, dtype: torch.dtype, s: float) -> list[Case]:
    from kernels.cross_entropy import fused_linear_cross_entropy, linear_cross_entropy_reference
    from kernels.flash_attention import flash_attention, flash_attention_reference
    from kernels.moe import moe_experts, moe_experts_reference
    from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference
    from kernels.rms_norm import rms_norm, rms_norm_reference
    from kernels.rotary import apply_rotary, apply_rotary_reference, rope_inv_freq
    from kernels.swiglu import silu_and_mul, silu_and_mul_reference

    D, H, K, d, E, I, V = (SCOUT[k] for k in ("D", "H", "K", "d", "E", "I", "V"))
    if s < 1:  # CPU: shrink widths as well as token counts so a run takes minutes, not hours
        D, I, V = int(D * s) // 64 * 64, int(I * s) // 64 * 64, int(V * s)
    T = max(16, int(8192 * s))
    esz = torch.finfo(dtype).bits // 8

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, device=device, dtype=dt)

    out: list[Case] = []
    x, res, w = rnd(T, D), rnd(T, D), rnd(D)

    def rms_ref(x, res, w):
        h = x + res
        return rms_norm_reference(h, w, 1e-5), h
    out.append(Case("rms_norm + residual", "memory", 5 * T * D * esz, 0, lambda: rms_norm(x, w, 1e-5, res),
                    lambda: rms_ref(x, res, w), rms_ref, (x, res, w)))

    qkv = rnd(T, (H + 2 * K) * d)
    q, k = qkv[:, :H * d].view(T, H, d), qkv[:, H * d:(H + K) * d].view(T, K, d)
    pos, inv = torch.arange(T, device=device), rope_inv_freq(d, 500000.0).to(device)
    out.append(Case("rotary q,k (in place)", "memory", 2 * T * (H + K) * d * esz, 0,
                    lambda: apply_rotary(q, k, pos, inv, True),
                    lambda: apply_rotary_reference(q, k, pos, inv, True), apply_rotary_reference,
                    (q, k, pos, inv, True)))

    gu = rnd(T, 2 * I)
    out.append(Case("silu_and_mul", "memory", 3 * T * I * esz, 0, lambda: silu_and_mul(gu),
                    lambda: silu_and_mul_reference(gu), silu_and_mul_reference, (gu,)))

    Tm = max(16, int(4096 * s))
    xm = rnd(Tm, D) * 0.1
    ids = torch.randint(0, E, (Tm, 1), device=device)
    sc = torch.rand(Tm, 1, device=device, dtype=dtype)
    wgu, wd = rnd(E, D, 2 * I) * 0.02, rnd(E, I, D) * 0.02
    moe_flops = 2 * Tm * 3 * D * I
    out.append(Case("moe_experts (top-1, grouped GEMM)", "compute", 3 * E * D * I * esz, moe_flops,
                    lambda: moe_experts(xm, ids, sc, wgu, wd),
                    lambda: moe_experts_reference(xm, ids, sc, wgu, wd), moe_experts_reference,
                    (xm, ids, sc, wgu, wd)))

    B, ctx, S = 64, max(64, int(4096 * s)), 16
    nblk = ctx // S
    kc, vc = rnd(B * nblk + 1, S, K, d), rnd(B * nblk + 1, S, K, d)
    tables = torch.randperm(B * nblk, device=device).view(B, nblk).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=device)
    qd = rnd(B, H, d)
    k_cont = kc[tables.long()].reshape(B, ctx, K, d).transpose(1, 2).contiguous()
    v_cont = vc[tables.long()].reshape(B, ctx, K, d).transpose(1, 2).contiguous()

    def sdpa_contiguous(qd, k_cont, v_cont):
        return F.scaled_dot_product_attention(qd[:, :, None], k_cont, v_cont, scale=d ** -0.5, enable_gqa=True)
    out.append(Case(f"paged decode attention (B={B}, ctx={ctx})", "memory", 2 * B * ctx * K * d * esz,
                    4 * B * ctx * H * d, lambda: paged_decode_attention(qd, kc, vc, tables, lens, d ** -0.5),
                    lambda: sdpa_contiguous(qd, k_cont, v_cont), paged_decode_attention_reference,
                    (qd, kc, vc, tables, lens, d ** -0.5), peer_name="torch SDPA, contiguous cache"))

    L, nseq = max(64, int(4096 * s)), 4
    qf, kf, vf = rnd(nseq * L, H, d), rnd(nseq * L, K, d), rnd(nseq * L, K, d)
    cu = torch.arange(0, (nseq + 1) * L, L, device=device, dtype=torch.int32)
    causal_flops = 4 * nseq * L * L * H * d / 2

    def sdpa_causal(qf, kf, vf):
        def split(t):
            return t.view(nseq, L, -1, d).transpose(1, 2)
        return F.scaled_dot_product_attention(split(qf), split(kf), split(vf), is_causal=True, enable_gqa=True)
    out.append(Case(f"flash attention prefill ({nseq}x{L}, causal)", "compute", 0, causal_flops,
                    lambda: flash_attention(qf, kf, vf, cu, cu, d ** -0.5),
                    lambda: sdpa_causal(qf, kf, vf), flash_attention_reference,
                    (qf, kf, vf, cu, cu, d ** -0.5), peer_name="torch SDPA (causal)"))

    N = max(16, int(8192 * s))
    hid = rnd(N, D, dt=dtype).requires_grad_()
    head = (rnd(V, D) * 0.02).requires_grad_()
    labels = torch.randint(0, V, (N,), device=device)

    def ce_step(fn):
        def run():
            loss = fn(hid, head, labels)
            loss.backward()
            return loss
        return run
    out.append(Case(f"fused linear + cross-entropy fwd+bwd (N={N}, V={V})", "compute", 0, 6 * N * D * V,
                    ce_step(fused_linear_cross_entropy), ce_step(linear_cross_entropy_reference),
                    None, peer_name="torch eager (full logits)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--only", default="", help="comma-separated prefixes of case names")
    ap.add_argument("--cpu-scale", type=float, default=1 / 16, help="shape scale without a GPU")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    scale = 1.0 if device == "cuda" else args.cpu_scale
    dev_name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton not run: no GPU)"
    copy_bw = copy_bandwidth(device, dtype, args.reps)
    print(f"{dev_name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s")
    rows = []
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    for case in cases(device, dtype, scale):
        if wanted and not any(case.name.startswith(p) for p in wanted):
            continue
        timings = {"herd": time_ms(case.herd, device, args.reps), case.peer_name: time_ms(case.eager, device, args.reps)}
        if case.compiled_fn is not None and not args.no_compile:
            compiled = torch.compile(case.compiled_fn)
            try:
                timings["torch.compile (reference)"] = time_ms(
                    lambda f=compiled, a=case.compiled_args: f(*a), device, args.reps)
            except Exception as e:  # noqa: BLE001 - a reference compile fails on some shapes; say so
                print(f"  {case.name}: torch.compile failed: {type(e).__name__}: {str(e)[:120]}")
        for impl, ms in timings.items():
            gbs = case.nbytes / (ms / 1e3) / 1e9 if case.nbytes else None
            tfs = case.flops / (ms / 1e3) / 1e12 if case.flops else None
            limit = (f"{case.nbytes / (ms / 1e3) / copy_bw:.0%} of copy" if case.bound == "memory"
                     else f"{case.flops / (ms / 1e3) / H100_BF16_FLOP_S:.0%} of H100 bf16" if device == "cuda"
                     else None)
            rows.append({"kernel": case.name, "impl": impl, "ms": ms, "GB/s": gbs, "TFLOP/s": tfs,
                         "vs limit": limit, "herd speedup": ms / timings["herd"]})
            print(f"  {case.name:<50} {impl:<28} {fmt(ms):>9} ms  {fmt(gbs):>8} GB/s  {fmt(tfs):>7} TFLOP/s"
                  f"  {limit or ''}")
    ratios = {r["kernel"]: r["herd speedup"] for r in rows if r["impl"] != "herd" and "eager" in r["impl"]}
    stem = f"kernels-{device}"
    out, command, info = write_results(stem, "kernels.py", rows, ratios)
    cols = [("kernel", "kernel"), ("impl", "implementation"), ("ms", "ms"), ("GB/s", "GB/s"),
            ("TFLOP/s", "TFLOP/s"), ("vs limit", "vs limit"), ("herd speedup", "herd's speed-up over it")]
    out.with_suffix(".md").write_text(
        f"# Kernels on {dev_name}\n\n`{command}`\n\nMachine: {info}\n\nCopy bandwidth measured: "
        f"{copy_bw / 1e9:.0f} GB/s; H100 limits used: {H100_BYTES_S / 1e12:.2f} TB/s, "
        f"{H100_BF16_FLOP_S / 1e12:.0f} bf16 TFLOP/s.\n\n{md_table(rows, cols)}\n")
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
