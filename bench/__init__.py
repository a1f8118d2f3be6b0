"""Benchmarks for spikeops (not tests: pytest only collects ``tests/``).

``python -m bench.run`` (or ``make bench``) runs every ``bench/bench_*.py`` module; each one
prints a markdown table and writes JSON to ``bench/results/`` (git-ignored).
"""
