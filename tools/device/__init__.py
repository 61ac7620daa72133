"""The GPU-host tooling behind ``python -m bench.device`` (see README.md here)."""
