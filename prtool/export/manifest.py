"""Manifests: the JSON written next to every artifact, and atomic JSON writes."""

from __future__ import annotations

import json
from pathlib import Path

from prtool.export.io_names import BATCH_AXIS, KEPT_INDICES, LOGITS, PIXELS
from prtool.util.files import follow_umask, sha256_file, write_json_atomic  # noqa: F401 - importable from here too

MANIFEST_VERSION = 1


def package_versions() -> dict:
    """Versions of the packages that shape an export (no network, no GPU probing)."""
    from importlib import metadata

    out = {}
    for dist in ("prtool", "torch", "open_clip_torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript",
                 "polygraphy", "tensorrt", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out


def build_manifest(loaded, spec, encoder, onnx_path: Path, options, names: list[str], predictor_meta, report,
                   extra: dict | None = None) -> dict:
    """Everything a consumer (or a later prtool command) needs to know about an exported graph."""
    h, w = encoder.image_size
    embed_dim = encoder.proj.shape[1] if encoder.proj is not None else encoder.width
    outputs = [{"name": names[0], "dtype": "float32", "shape": [BATCH_AXIS, embed_dim],
                "l2_normalized": options.normalize}]
    if KEPT_INDICES in names:
        outputs.append({"name": KEPT_INDICES, "dtype": "int64", "shape": [BATCH_AXIS, spec.schedule.final_keep],
                        "meaning": "row-major patch indices (0..N-1) kept after the last stage, most important first"})
    if LOGITS in names:
        outputs.append({"name": LOGITS, "dtype": "float32", "shape": [BATCH_AXIS, int(encoder.class_embeds.shape[0])],
                        "meaning": "logit_scale * cos(image, class text); class order in the manifest's 'classnames'",
                        "logit_scale": encoder.logit_scale})
    manifest = {
        "prtool_manifest": MANIFEST_VERSION,
        "kind": "onnx-image-encoder",
        "source": {**loaded.model_id},
        "pruned": not spec.schedule.is_empty,
        **spec.to_dict(),
        "num_prefix_tokens": encoder.num_prefix,
        "predictor_meta": predictor_meta,
        "predictor_sha256": sha256_file(spec.predictor_path) if spec.predictor_path else None,
        "inputs": [{"name": PIXELS, "dtype": "float32", "shape": [BATCH_AXIS, 3, h, w]}],
        "outputs": outputs,
        "preprocess": loaded.preprocess,
        "opset": options.opset,
        "exporter": options.exporter,
        "versions": package_versions(),
        "onnx_sha256": sha256_file(onnx_path),
        "onnx_file": onnx_path.name,
        "validation": report.to_dict() if report is not None else None,
    }
    if extra:
        manifest.update(extra)
    return manifest


def read_manifest_for(onnx_path: Path) -> dict | None:
    """The manifest beside an ONNX file (``model.onnx`` -> ``model.json``), if any."""
    side = Path(onnx_path).with_suffix(".json")
    if side.exists():
        try:
            return json.loads(side.read_text())
        except ValueError:
            return None
    return None


TRITON_MANIFEST = "prtool_manifest.json"  # beside config.pbtxt in a model folder written by `prtool package`


def manifest_path_for(onnx_path: Path) -> Path:
    """Where an ONNX file's manifest is: ``model.json`` beside ``model.onnx``, or, for the copy inside a
    Triton model folder (``<name>/<version>/model.onnx``), ``<name>/prtool_manifest.json``."""
    onnx_path = Path(onnx_path)
    triton = onnx_path.parent.parent / TRITON_MANIFEST
    if onnx_path.parent.name.isdigit() and triton.is_file() and not onnx_path.with_suffix(".json").exists():
        return triton
    return onnx_path.with_suffix(".json")


def checked_manifest(onnx_path: Path) -> dict:
    """The prtool manifest of an ONNX file, refused unless the file is the graph it describes (sha256)."""
    from prtool.errors import PrtoolError

    onnx_path = Path(onnx_path)
    side = manifest_path_for(onnx_path)
    if not side.is_file():
        raise PrtoolError(f"{onnx_path} has no manifest {side.name}: export it with `prtool export`")
    try:
        manifest = json.loads(side.read_text())
    except (ValueError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or "onnx_sha256" not in manifest:
        raise PrtoolError(f"{side} beside {onnx_path.name} is not a prtool export manifest: export it with `prtool "
                          "export`")
    sha = sha256_file(onnx_path)
    if sha != manifest["onnx_sha256"]:
        raise PrtoolError(f"{onnx_path} (sha256 {sha[:12]}) is not the graph its manifest {side} describes "
                          f"({manifest.get('onnx_file')}, sha256 {manifest['onnx_sha256'][:12]}): keep each export's "
                          ".onnx and .json together, or re-export")
    return manifest
