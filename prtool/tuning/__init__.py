"""Training on top of a frozen CLIP: learnable text context and visual tokens, tuned with pruning on (`prtool
tune`), and method heads trained the same way (A-ViT's halting head).

May import: prtool.errors, prtool.util, prtool.testbed.spec, prtool.encoder, prtool.data.
Enforced by tests/test_architecture.py.
"""
