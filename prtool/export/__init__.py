"""Phase III: fixed-k ONNX export of the image and text encoders, graph checks, manifests, validation against
PyTorch, and the graphs derived from an export (the mixed-precision fp16 graph, quantized INT8/FP16 exports) whose
scorer, TopK and index path stay exact.

May import: prtool.errors, prtool.util, prtool.testbed.spec, prtool.encoder, prtool.data, prtool.tuning,
prtool.runtime.
Enforced by tests/test_architecture.py.
"""
