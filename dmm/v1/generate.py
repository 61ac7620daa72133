"""Regenerate the Python stubs of ``proto/dmm/v1/policy.proto`` into ``dmm/v1/``.

Run from anywhere: ``python -m dmm.v1.generate``. It calls grpcio-tools' bundled ``protoc`` with
``-Iproto --python_out=. --grpc_python_out=. --pyi_out=.`` from the repository root, so the
generated modules import each other as ``dmm.v1.policy_pb2``. ``--out DIR`` writes elsewhere
(the tests generate into a temporary folder and compare bytes with the committed stubs).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILES = ("dmm/v1/policy.proto",)
GENERATED = ("policy_pb2.py", "policy_pb2.pyi", "policy_pb2_grpc.py")


def generate(out_dir: str | Path = REPO_ROOT) -> list[Path]:
    """Run protoc on the service's proto files; return the paths of the generated stubs."""
    from grpc_tools import protoc  # dev dependency, needed only to regenerate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *(str(PROTO_ROOT / p) for p in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return [out / "dmm" / "v1" / name for name in GENERATED]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO_ROOT), help="output root (default: the repository root)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
