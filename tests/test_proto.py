"""The committed gRPC stubs are exactly what grpcio-tools generates from proto/dmm/v1/policy.proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmm.v1.generate import GENERATED, generate

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_committed_stubs_match_fresh_generation(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    fresh = generate(tmp_path)
    assert [p.name for p in fresh] == list(GENERATED)
    for path in fresh:
        committed = REPO_ROOT / "dmm" / "v1" / path.name
        assert committed.read_bytes() == path.read_bytes(), (
            f"{committed} is stale; regenerate with `python -m dmm.v1.generate`"
        )


def test_stubs_import_without_torch() -> None:
    code = (
        "import sys\n"
        "from dmm.v1 import policy_pb2, policy_pb2_grpc\n"
        "assert hasattr(policy_pb2_grpc, 'PolicyServiceStub')\n"
        "assert 'torch' not in sys.modules, 'dmm.v1 imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)


def test_messages_round_trip() -> None:
    from dmm.v1 import policy_pb2

    req = policy_pb2.ActRequest(step=policy_pb2.Step(state=[0.5, -1.25], reward=2.0))
    back = policy_pb2.ActRequest.FromString(req.SerializeToString())
    assert back.WhichOneof("kind") == "step"
    assert back.step.WhichOneof("return_to_go") == "reward"
    assert list(back.step.state) == [0.5, -1.25]
    start = policy_pb2.Start(model="m")
    assert not start.HasField("version") and not start.HasField("target_return")
