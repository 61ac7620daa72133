"""Every GPU measurement in one call: ``python -m bench.device`` on a lent GPU host, ``python -m
bench.device --dry-run`` to rehearse every step at tiny sizes on the CPU.

This module is the entry point GPU hosts are given; the host-side plumbing (install, probe, the
steps, the score data's transfer) lives in ``tools/device/``, whose README lists its commands.
"""

from __future__ import annotations

import sys

from tools.device.host import main

if __name__ == "__main__":
    sys.exit(main())
