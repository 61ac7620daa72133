"""Benchmarks of decision-metamamba: training speed, evaluation speed, serving latency, scores.

Run from the repository root, e.g. ``python -m bench.train_speed --quick``.
"""
