"""What runs an exported graph on this machine: onnxruntime sessions and providers, TensorRT/onnxruntime version
pins, the environment report.

May import: prtool.errors and prtool.util only.
Enforced by tests/test_architecture.py.
"""
