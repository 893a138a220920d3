"""Evaluation and benchmarks: zero-shot accuracy, speed, Pareto fronts, precision drift, reports, pictures of
kept patches, the demo.

May import: every package but prtool.cli.
Enforced by tests/test_architecture.py.
"""
