"""Compares the generated token ids of two peer result files (same workload), request by request.

    python benchmarks/peers/compare_outputs.py A.json B.json

Prints, per request, whether the ids match exactly and the length of the common prefix; exits 0.
Greedy decoding in bf16 on different kernels may diverge after some tokens once two candidates are
near-tied, so a long common prefix is the expected sign of agreement, not always an exact match.
"""

import json
import sys
from pathlib import Path


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.loads(Path(p).read_text()) for p in sys.argv[1:])
    if a["workload"] != b["workload"] or len(a["outputs"]) != len(b["outputs"]):
        sys.exit(f"different workloads: {a['workload']} ({len(a['outputs'])} requests) vs "
                 f"{b['workload']} ({len(b['outputs'])} requests)")
    exact = 0
    prefixes = []
    for i, (x, y) in enumerate(zip(a["outputs"], b["outputs"])):
        n = common_prefix(x, y)
        prefixes.append(n)
        same = x == y
        exact += same
        print(f"request {i}: {'exact' if same else 'differs'}; common prefix {n} "
              f"of {len(x)} ({a['engine']}) / {len(y)} ({b['engine']})")
    print(f"{a['engine']} vs {b['engine']} on {a['workload']}: {exact}/{len(prefixes)} exact, "
          f"mean common prefix {sum(prefixes) / len(prefixes):.1f} tokens")


if __name__ == "__main__":
    main()
