"""Deployment: TensorRT engines and their manifests, the mixed-precision check, Triton repositories, the runtime
compatibility matrix, the ONNX contract's worked example, artifact verification.

One job per module, heavy dependencies imported inside the functions that need them:

- ``build_config``: the resolved engine build configuration and its ``trtexec`` command (pure).
- ``build_request``: ``prtool build``'s options as one dataclass (the ``[build]`` recipe schema) and its one call.
- ``trt``: build a TensorRT engine, run it, describe the running TensorRT/GPU (needs ``tensorrt``).
- ``engine_manifest``: the JSON beside every engine, and the refusal of a mismatched engine.
  ``prtool.runtime.session.ort_session`` (the one session factory) applies.
- ``rebuild`` + ``verify``: rebuild the PyTorch encoder from a manifest and compare an artifact with it.
- ``triton``: a Triton model repository from an ONNX file and/or an engine.
- ``compat``: the runtime x export-variant compatibility matrix (``python -m prtool.deploy.compat``).
- ``contract``: the worked numeric example of the ONNX I/O contract (``python -m prtool.deploy.contract``).
- ``docgen``: the thin command-line entry points of ``compat`` and ``contract`` (their work is library functions).

May import: everything below it: prtool.errors, .util, .testbed, .encoder, .data, .tuning, .runtime, .export.
Not prtool.ranking, prtool.bench or prtool.cli.
Enforced by tests/test_architecture.py.
"""
