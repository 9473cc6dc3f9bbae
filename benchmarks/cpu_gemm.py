"""bfloat16 GEMMs on CPU: torch's bfloat16 GEMM (what a bfloat16 model runs by default, in herd
without float32 copies, in transformers and in vLLM-CPU) beside herd's float32-copy path
(serving/engine/cpu_gemm.py: bfloat16 input widened, float32 GEMM, output rounded to bfloat16),
on the same weights, in one run. On CPUs without bfloat16 arithmetic (no AVX512-BF16, no AMX)
this is what picks cpu_gemm.MIN_ROWS.

    .venv/bin/python benchmarks/cpu_gemm.py [--rows 1 8 16 32 64 128 256] [--reps 30]

Shapes: the default model's (SmolLM2-135M) layers and its tied output head. Each time is the
median of --reps calls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.append(str(ROOT / "benchmarks"))

from quant_matmul import median_us
from report import md_table, write_results
from tqdm import tqdm

from serving.engine.cpu_gemm import Float32GemmLinear

SHAPES = {"qkv (960x576)": (960, 576), "o (576x576)": (576, 576), "gate_up (3072x576)": (3072, 576),
          "down (576x1536)": (576, 1536), "head (49152x576)": (49152, 576)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 256])
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = []
    cases = [(name, N, K, M) for name, (N, K) in SHAPES.items() for M in args.rows]
    for name, N, K, M in tqdm(cases, desc="shapes x rows"):
        lin = Float32GemmLinear((torch.randn(N, K, generator=g) * 0.05).bfloat16())
        lin.min_rows = 1  # always the float32 copy here
        x = torch.randn(M, K, generator=g).bfloat16()
        ours = median_us(lin, x, args.reps)
        peer = median_us(lambda x, w=lin.weight: F.linear(x, w), x, args.reps)
        rows.append({"layer": name, "rows": M, "herd us": ours, "torch us": peer, "herd speed-up": peer / ours})
    ratios = {f"{r['layer']} rows {r['rows']}": r["herd speed-up"] for r in rows}
    out, command, info = write_results("cpu-gemm", "cpu_gemm.py", rows, ratios)
    cols = [("layer", "layer"), ("rows", "rows"), ("herd us", "herd float32-copy us"),
            ("torch us", "torch bf16 us"), ("herd speed-up", "herd's speed-up (torch / herd)")]
    out.with_suffix(".md").write_text(
        f"# bfloat16 layers: herd's float32-copy GEMM vs torch's bfloat16 GEMM\n\n`{command}`\n\n"
        f"Machine: {info}\n\n{md_table(rows, cols)}\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
