"""Regenerate the Python code for the wire contract.

Usage: ``python -m inversion_monitor.proto.generate [OUT_DIR]`` (default: the
folder of this file). The ``.proto`` files are compiled under the virtual
include path ``inversion_monitor/proto``, so the generated modules import
each other as ``inversion_monitor.proto.v1...``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_FILES = ("v1/monitor.proto",)
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Compile every ``.proto`` into ``out_dir`` (mirroring ``v1/``); returns the files."""
    from grpc_tools import protoc  # dev dependency: grpcio-tools

    with tempfile.TemporaryDirectory() as tmp:
        include = Path(protoc.__file__).parent / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-Iinversion_monitor/proto={PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(f"inversion_monitor/proto/{name}" for name in PROTO_FILES),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        produced = Path(tmp) / "inversion_monitor" / "proto"
        written = []
        for path in sorted(produced.rglob("*")):
            if path.is_file() and path.name.endswith(GENERATED_SUFFIXES):
                target = out_dir / path.relative_to(produced)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)
                written.append(target)
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT
    for path in generate(out):
        print(path)
