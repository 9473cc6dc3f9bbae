"""Generates the Python gRPC stubs next to each .proto under protos/ (grpcio-tools).

setup.py runs this on every build (wheel or editable install); `python -m protos.build`
regenerates by hand after editing a .proto.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def generate(root: Path = ROOT) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(p.relative_to(root) for p in (root / "protos").rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"  # well-known types
    for proto in protos:
        args = ["grpc_tools.protoc", f"-I{root}", f"-I{include}", f"--python_out={root}",
                f"--pyi_out={root}", f"--grpc_python_out={root}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return protos


if __name__ == "__main__":
    for p in generate():
        print(f"generated stubs for {p}", file=sys.stderr)
