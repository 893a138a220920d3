"""The pruned image encoder: schedules, the token-dropping transformer, its methods and rankers (scorers, peers,
merging), the ranking predictor network, model loading, FLOP counts.

May import: prtool.errors, prtool.util and the testbed's definition (prtool.testbed.spec). Nothing else.
Enforced by tests/test_architecture.py.
"""
