"""Benchmarks: ``specmq bench NAME`` (see benchmarks/cli.py)."""
