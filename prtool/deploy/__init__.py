"""Deployment: TensorRT engines, GPU runners, Triton repositories, runtime compatibility.

One job per module, heavy dependencies imported inside the functions that need them:

- ``build_config``: the resolved engine build configuration and its ``trtexec`` command (pure).
- ``build_request``: ``prtool build``'s options as one dataclass (the ``[build]`` recipe schema) and its one call.
- ``trt``: build a TensorRT engine, run it, describe the running TensorRT/GPU (needs ``tensorrt``).
- ``engine_manifest``: the JSON beside every engine, and the refusal of a mismatched engine.
- ``ort_gpu``: the provider table, CUDA/TensorRT provider options and the silent-fallback check that
  ``prtool.runtime.ort_session`` (the one session factory) applies.
- ``rebuild`` + ``verify``: rebuild the PyTorch encoder from a manifest and compare an artifact with it.
- ``triton``: a Triton model repository from an ONNX file and/or an engine.
- ``compat``: the runtime x export-variant compatibility matrix (``python -m prtool.deploy.compat``).
- ``contract``: the worked numeric example of the ONNX I/O contract (``python -m prtool.deploy.contract``).
- ``docgen``: the thin command-line entry points of ``compat`` and ``contract`` (their work is library functions).
"""
