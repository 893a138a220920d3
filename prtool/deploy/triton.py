"""A Triton Inference Server model repository from an ONNX export and/or a TensorRT engine.

``package_triton([model.onnx, model.plan], DIR)`` writes, per artifact::

    DIR/<name>/config.pbtxt             platform, max_batch_size, inputs/outputs, dynamic_batching
    DIR/<name>/1/model.onnx | model.plan (+ the ONNX's external data file, if any)
    DIR/<name>/prtool_manifest.json      the artifact's prtool manifest
    DIR/<name>/README.md                 how to serve and load-test it (perf_analyzer)

Names, dims (without the batch) and data types come from the manifests; each model folder is
assembled in a temporary folder inside ``DIR`` and renamed into place, so a failure leaves none.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prtool.errors import PrtoolError

DEFAULT_MAX_BATCH = 32
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                "int32": "TYPE_INT32", "bool": "TYPE_BOOL"}
PLATFORMS = {"onnx": "onnxruntime_onnx", "trt": "tensorrt_plan"}
BACKENDS = {"onnx": "onnxruntime", "trt": "tensorrt"}


@dataclass
class TritonModel:
    """One model folder to write: ``kind`` is ``onnx`` or ``trt``; tensors are ``(name, dtype, dims)``."""

    name: str
    kind: str
    source: Path
    extra_files: list[Path]
    manifest: dict
    max_batch: int
    inputs: list[tuple[str, str, list[int]]]
    outputs: list[tuple[str, str, list[int]]]
    note: str


def _tensors(entries: list[dict], where: str) -> list[tuple[str, str, list[int]]]:
    out = []
    for e in entries:
        if e["dtype"] not in TRITON_TYPES:
            raise PrtoolError(f"{where}: tensor {e['name']} has dtype {e['dtype']}, which Triton's config cannot name")
        out.append((e["name"], e["dtype"], [int(d) for d in e["shape"][1:]]))
    return out


def _external_data(onnx_path: Path) -> list[Path]:
    from prtool.export.onnx_graph import load_onnx

    files = set()
    for t in load_onnx(onnx_path).graph.initializer:
        files |= {kv.value for kv in t.external_data if kv.key == "location"}
    return [onnx_path.parent / f for f in sorted(files)]


def _onnx_model(path: Path, name: str, max_batch: int | None) -> TritonModel:
    from prtool.export.manifest import checked_manifest
    from prtool.export.onnx_graph import io_shapes, load_onnx

    manifest = checked_manifest(path)
    graph = io_shapes(load_onnx(path))
    declared = [(t["name"], t["shape"][1:]) for t in manifest["inputs"] + manifest["outputs"]]
    actual = [(t["name"], t["shape"][1:]) for t in graph["inputs"] + graph["outputs"]]
    if declared != actual:
        raise PrtoolError(f"manifest of {path} declares {declared}, the graph has {actual}: re-export it")
    mb = DEFAULT_MAX_BATCH if max_batch is None else max_batch
    if mb < 1:
        raise PrtoolError(f"--max-batch {mb} must be at least 1")
    return TritonModel(name, "onnx", path, _external_data(path), manifest, mb,
                       _tensors(manifest["inputs"], str(path)), _tensors(manifest["outputs"], str(path)),
                       "ONNX Runtime runs the FP32 graph; its batch axis is dynamic, max_batch_size caps it.")


def _engine_model(path: Path, name: str, max_batch: int | None) -> TritonModel:
    from prtool.deploy.engine_manifest import read_engine_manifest

    m = read_engine_manifest(path)
    lo, hi = m["profile"]["min"][0], m["profile"]["max"][0]
    if lo != 1:
        raise PrtoolError(f"engine {path} accepts batches {lo}..{hi}, but Triton sends any batch from 1: "
                          "rebuild it with --min-batch 1")
    if max_batch is not None and not 1 <= max_batch <= hi:
        raise PrtoolError(f"--max-batch {max_batch} is outside engine {path}'s profile 1..{hi}: pass at most {hi} "
                          "or rebuild with a larger --max-batch")
    io = m["io"]
    note = (f"Built with TensorRT {m['tensorrt']} for {m['gpu']['name']} (compute capability "
            f"{m['gpu']['compute_capability']}), {m['precision']}: serve it with a Triton release that ships exactly "
            "this TensorRT version, on that GPU model; anything else refuses to load the plan.")
    return TritonModel(name, "trt", path, [], m, max_batch or hi,
                       _tensors([t for t in io if t["mode"] == "input"], str(path)),
                       _tensors([t for t in io if t["mode"] == "output"], str(path)), note)


def config_pbtxt(model: TritonModel) -> str:
    """The model's ``config.pbtxt`` (protobuf text format)."""

    def block(tensors):
        items = [f'  {{\n    name: "{n}"\n    data_type: {TRITON_TYPES[d]}\n'
                 f'    dims: [ {", ".join(map(str, dims))} ]\n  }}'
                 for n, d, dims in tensors]
        return "[\n" + ",\n".join(items) + "\n]"

    return (f"# Written by `prtool package` from {model.source.name}; backend: {BACKENDS[model.kind]}\n"
            f'name: "{model.name}"\nplatform: "{PLATFORMS[model.kind]}"\nmax_batch_size: {model.max_batch}\n'
            f"input {block(model.inputs)}\noutput {block(model.outputs)}\ndynamic_batching {{ }}\n")


def readme(model: TritonModel, repo: Path) -> str:
    shapes = ", ".join(f"{n} {d}{dims}" for n, d, dims in model.inputs + model.outputs)
    batch = min(8, model.max_batch)
    return f"""# {model.name}

Triton model written by `prtool package` from `{model.source.name}` ({PLATFORMS[model.kind]}).
Tensors (batch axis excluded, up to {model.max_batch} per request): {shapes}.
{model.note}

Feed `pixel_values` preprocessed exactly as `prtool_manifest.json` says (`preprocess`): RGB, resize the
shortest side (bicubic), center crop, `/255`, then `(x - mean) / std`.

Serve and load-test (perf_analyzer ships in Triton's SDK container):

```sh
tritonserver --model-repository={repo}
perf_analyzer -m {model.name} -b {batch} --concurrency-range 1:8 --percentile=95
```

`-b` is the batch per request; dynamic batching merges concurrent requests up to max_batch_size.
Compare configurations by their throughput ratio in one run, not by absolute numbers across machines.
"""


def _name(base: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", base).strip("._")
    if not name:
        raise PrtoolError(f"cannot derive a Triton model name from {base!r}: pass --name")
    return name


def package_triton(artifacts: list[Path], out_dir: Path, name: str | None = None,
                   max_batch: int | None = None) -> list[dict]:
    """Write one Triton model folder per artifact (an .onnx and/or a .plan/.engine) into ``out_dir``."""
    from prtool.deploy.engine_manifest import ENGINE_SUFFIXES, engine_manifest_path
    from prtool.export.manifest import manifest_path_for

    artifacts = [Path(a) for a in artifacts]
    onnx = [a for a in artifacts if a.suffix == ".onnx"]
    plans = [a for a in artifacts if a.suffix in ENGINE_SUFFIXES]
    other = [a for a in artifacts if a not in onnx and a not in plans]
    if other or not artifacts or len(onnx) > 1 or len(plans) > 1:
        raise PrtoolError("pass one .onnx and/or one engine (.plan/.engine)"
                          + (f"; not {', '.join(map(str, other))}" if other else ""))
    for a in artifacts:
        if not a.is_file():
            raise PrtoolError(f"{a} does not exist" + (" as a file (it is a directory)" if a.is_dir() else ""))
    base = name or artifacts[0].stem
    both = bool(onnx and plans)
    models = []
    if onnx:
        models.append(_onnx_model(onnx[0], _name(base + ("_onnx" if both else "")), max_batch))
    if plans:
        models.append(_engine_model(plans[0], _name(base + ("_trt" if both else "")), max_batch))
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrtoolError(f"cannot create {out_dir} ({exc.strerror}): pass a writable --triton folder") from None
    for m in models:
        if (out_dir / m.name).exists():
            raise PrtoolError(f"{out_dir / m.name} already exists: remove it or pass another --name")
    tmp = Path(tempfile.mkdtemp(prefix=".prtool-package-", dir=out_dir))
    try:
        for m in models:
            folder = tmp / m.name
            (folder / "1").mkdir(parents=True)
            shutil.copy2(m.source, folder / "1" / f"model.{'onnx' if m.kind == 'onnx' else 'plan'}")
            for f in m.extra_files:
                shutil.copy2(f, folder / "1" / f.name)
            side = engine_manifest_path(m.source) if m.kind == "trt" else manifest_path_for(m.source)
            shutil.copy2(side, folder / "prtool_manifest.json")
            (folder / "config.pbtxt").write_text(config_pbtxt(m))
            (folder / "README.md").write_text(readme(m, out_dir))
        for m in models:
            os.replace(tmp / m.name, out_dir / m.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [{"name": m.name, "platform": PLATFORMS[m.kind], "path": str(out_dir / m.name),
             "max_batch_size": m.max_batch,
             "inputs": [list(t) for t in m.inputs], "outputs": [list(t) for t in m.outputs]} for m in models]
