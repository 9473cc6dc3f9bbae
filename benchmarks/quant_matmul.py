"""herd's int4 / int8 VNNI matmuls (serving/engine/csrc/vnni_matmul.cpp) beside torch's
weight-only kernels (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`, bf16 activations, as
Int4Linear / Int8Linear run without herd's) on the same weights, in one run, on CPU; both
called through the C++ decode step's Linear wrapper, as the step calls them.

    .venv/bin/python benchmarks/quant_matmul.py [--batches 1 4 16 64 256] [--reps 50]

Shapes: the default model's (SmolLM2-135M: hidden 576, MLP 1536, vocab 49152) layers, as the
engine calls them (float32 in, float32 out). Each time is the median of --reps calls; GB/s counts
the weights' bytes once per call (what bounds a decode step at small batch).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.append(str(ROOT / "benchmarks"))

from report import fmt, md_table, write_results
from tqdm import tqdm

from kernels.int4_linear import Int4Linear
from kernels.int8_linear import Int8Linear
from serving.engine import native_decode

SHAPES = {"qkv (960x576)": (960, 576), "o (576x576)": (576, 576), "gate_up (3072x576)": (3072, 576),
          "down (576x1536)": (576, 1536), "lm_head int8 (49152x576)": (49152, 576)}


def median_us(fn, x, reps: int) -> float:
    for _ in range(3):
        fn(x)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args()
    ext = native_decode.extension()
    if not ext.vnni_supported():
        sys.exit("this CPU has no AVX-512 VNNI: herd's quantized matmuls do not run here")
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = [(name, N, K, M) for name, (N, K) in SHAPES.items() for M in args.batches]
    for name, N, K, M in tqdm(cases, desc="shapes x batches"):
        w = torch.randn(N, K, generator=g) * 0.05
        if "int8" in name:
            lin, nbytes = Int8Linear(w), N * K + 2 * N
        else:
            lin, nbytes = Int4Linear.from_float(w, 32), N * K // 2 + 4 * N * K // 32
        # Both called the way the C++ decode step calls them (no Python module in between).
        herd, peer_fn = native_decode._vnni_kernel(ext, lin), native_decode._native_linear(ext, lin, torch.float32)
        x = torch.randn(M, K, generator=g)
        ours = median_us(herd, x, args.reps)
        peer = median_us(peer_fn, x, args.reps)
        rows.append({"layer": name, "batch": M, "herd us": ours, "torch us": peer, "herd speed-up": peer / ours,
                     "herd GB/s": nbytes / ours / 1e3})
    ratios = {f"{r['layer']} batch {r['batch']}": r["herd speed-up"] for r in rows}
    out, command, info = write_results("quant-matmul-cpu", "quant_matmul.py", rows, ratios)
    cols = [("layer", "layer"), ("batch", "batch"), ("herd us", "herd VNNI us"), ("torch us", "torch us"),
            ("herd speed-up", "herd's speed-up (torch / herd)"), ("herd GB/s", "herd weights GB/s")]
    table = md_table(rows, cols)
    out.with_suffix(".md").write_text(
        f"# herd's VNNI int4/int8 matmuls vs torch's weight-only kernels\n\n`{command}`\n\n"
        f"Machine: {info}\n\n{table}\n")
    print(table)
    print(f"wrote {out}.md; overall speed-up (geometric mean) "
          f"{fmt(statistics.geometric_mean(r['herd speed-up'] for r in rows))}")


if __name__ == "__main__":
    main()
