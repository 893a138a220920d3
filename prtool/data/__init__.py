"""Images and datasets: decoding and preprocessing, dataset manifests, zero-shot class embeddings.

May import: prtool.errors, prtool.util and the testbed's data (prtool.testbed.spec, .data, .eval_set).
Enforced by tests/test_architecture.py.
"""
