"""Phase I and II: golden rankings (greedy patch removal), the sharded resumable rankings store, training the
ranking predictor on it, and the jobs behind `prtool rank` / `prtool train`.

May import: prtool.errors, prtool.util, prtool.testbed.spec, prtool.encoder, prtool.data.
Enforced by tests/test_architecture.py.
"""
