"""A benchmark worker for tests: it waits to be stopped and, on SIGTERM, writes a file the way a
training run saves its state (run as ``python -m tests.stoppable_worker --worker JSON``)."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from bench.harness import serve_worker


def wait_for_stop(spec: dict[str, Any]) -> dict[str, Any]:
    """Write ``ready`` (holding this pid), wait up to ``timeout_s`` for SIGTERM, then write ``saved``."""
    folder = Path(spec["folder"])
    stopped = False

    def stop(_signum: int, _frame: Any) -> None:
        nonlocal stopped
        stopped = True

    signal.signal(signal.SIGTERM, stop)
    # Written under another name and renamed, so that the test never reads it half-written.
    (folder / "ready.tmp").write_text(str(os.getpid()))
    (folder / "ready.tmp").replace(folder / "ready")
    deadline = time.monotonic() + spec["timeout_s"]
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    (folder / "saved").write_text("on SIGTERM" if stopped else "timed out")
    return {"stopped": stopped}


if __name__ == "__main__":
    serve_worker(sys.argv[1:], wait_for_stop)
