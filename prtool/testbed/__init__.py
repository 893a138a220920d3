"""The testbed: a small CLIP that prtool trains itself on Cluttered Fashion-MNIST. spec is its definition
(constants, imports nothing), data and eval_set render the shipped splits, train and reference build the
checkpoint.

May import: spec: nothing; data, eval_set: prtool.errors, prtool.util, testbed.spec; train, reference: also
prtool.encoder and prtool.data.
Enforced by tests/test_architecture.py.
"""
