"""Export the (pruned) image encoder to ONNX, validate it, and write its manifest atomically.

``export_onnx(...)`` mirrors ``prtool export``: tests call the function, the CLI only parses.
Nothing appears at the output path unless the export (and, by default, its validation)
succeeded: the graph is written in a temporary folder beside the target and renamed into place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prtool.build import EncoderSpec, build_pruned_encoder
from prtool.errors import PrtoolError, ValidationError
from prtool.manifest import build_manifest, write_json_atomic
from prtool.models import LoadedModel
from prtool.validate import Tolerances, ValidationReport, _as_tuple, validate_onnx

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
EMBEDS_NAME = "image_embeds"
INDICES_NAME = "kept_patch_indices"
LOGITS_NAME = "logits"
MIN_OPSET, MAX_OPSET = 17, 21
EXPORTERS = ("torchscript", "dynamo")
EXTERNAL_DATA_BYTES = 1_800_000_000  # below protobuf's 2 GB limit, with headroom


@dataclass
class ExportOptions:
    opset: int = 18
    exporter: str = "torchscript"
    normalize: bool = True
    with_kept_indices: bool = False
    validate: bool = True
    allow_failed_validation: bool = False
    images: Path | None = None
    batch_size: int = 7
    tolerances: Tolerances = field(default_factory=Tolerances)


@dataclass
class ExportResult:
    onnx_path: Path
    manifest_path: Path
    manifest: dict
    report: ValidationReport | None
    encoder: torch.nn.Module | None = None  # the PyTorch module the graph was traced from (quantized exports)


def output_names(with_indices: bool, with_logits: bool = False) -> list[str]:
    return [EMBEDS_NAME] + ([INDICES_NAME] if with_indices else []) + ([LOGITS_NAME] if with_logits else [])


class WithClassifier(torch.nn.Module):
    """Adds ``logits = logit_scale * normalize(image_embeds) @ class_embeds.T`` (``[B, C]``) as a
    last output, with the class text embeddings baked in as a constant. Other attributes (schedule,
    scorer, ...) are the wrapped encoder's."""

    def __init__(self, encoder: torch.nn.Module, class_embeds: torch.Tensor, logit_scale: float):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("class_embeds", class_embeds.detach().float().clone())
        self.logit_scale = float(logit_scale)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.encoder, name)

    def forward(self, pixels: torch.Tensor):
        out = _as_tuple(self.encoder(pixels))
        emb = torch.nn.functional.normalize(out[0], dim=-1)
        return (*out, self.logit_scale * emb @ self.class_embeds.t())


@contextlib.contextmanager
def mha_fastpath_disabled():
    """The TorchScript exporter cannot export ``aten::_native_multi_head_attention``."""
    prev = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(prev)


def _check_output_dir(out: Path) -> None:
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrtoolError(f"cannot create output directory {parent} ({exc.strerror}): pass a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise PrtoolError(f"output directory {parent} is not writable: pass a writable --out")
    if out.suffix != ".onnx":
        raise PrtoolError(f"output {out} must end in .onnx")


def trace_to_onnx(encoder: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str,
                  names: list[str]) -> None:
    """Run torch.onnx with batch as the only dynamic axis; the result is checked for it."""
    import onnx

    if example.shape[0] < 2:
        raise PrtoolError("export needs an example batch of at least 2 (a batch-1 example can pin the batch axis)")
    with mha_fastpath_disabled(), torch.no_grad():
        if exporter == "torchscript":
            axes = {n: {0: "batch"} for n in [INPUT_NAME, *names]}
            torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=names, dynamic_axes=axes,
                              do_constant_folding=True)
        elif exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=opset,
                                        input_names=[INPUT_NAME], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path))
        else:
            raise PrtoolError(f"unknown exporter {exporter!r}: use torchscript or dynamo")
        shapes = [tuple(t.shape) for t in _as_tuple(encoder(example))]
    model = onnx.load(str(path), load_external_data=False)
    declared = [tuple(example.shape)] + shapes
    for value, shape in zip(list(model.graph.input) + list(model.graph.output), declared):
        dims = value.type.tensor_type.shape.dim
        if not dims[0].dim_param:
            raise PrtoolError(f"the {exporter} exporter fixed the batch axis of {value.name}: this is a bug, please report it")
        dims[0].dim_param = "batch"
        for dim, size in zip(list(dims)[1:], shape[1:]):  # the contract: every other axis is static
            dim.Clear()
            dim.dim_value = int(size)
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > EXTERNAL_DATA_BYTES:
        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))


def export_onnx(loaded: LoadedModel, spec: EncoderSpec, out: Path, options: ExportOptions = ExportOptions(),
                visual_prompts=None, extra_manifest: dict | None = None,
                class_embeds: torch.Tensor | None = None) -> ExportResult:
    """Export, validate and write ``out`` (.onnx) + ``out`` with .json (the manifest).

    ``visual_prompts`` ``[P, D]`` are baked in as constants after CLS; ``class_embeds`` ``[C, E]``
    adds the ``logits`` output (a zero-shot or tuned classifier head).
    """
    out = Path(out)
    if options.opset < MIN_OPSET:
        raise PrtoolError(
            f"--opset {options.opset} is too old: prtool exports opset >= {MIN_OPSET} (LayerNormalization, "
            "which keeps TensorRT's FP16 LayerNorm accurate); use --opset 17 or 18"
        )
    if options.opset > MAX_OPSET:
        raise PrtoolError(f"--opset {options.opset} is newer than prtool supports ({MIN_OPSET}..{MAX_OPSET})")
    if options.exporter not in EXPORTERS:
        raise PrtoolError(f"unknown exporter {options.exporter!r}: use torchscript or dynamo")
    _check_output_dir(out)
    encoder, predictor_meta = build_pruned_encoder(loaded, spec, normalize=options.normalize,
                                                   return_indices=options.with_kept_indices,
                                                   visual_prompts=visual_prompts)
    if encoder.scorer is not None and not encoder.scorer.exportable:
        raise PrtoolError(f"scorer {encoder.scorer.name} cannot be exported: {encoder.scorer.why_not_exportable}")
    if class_embeds is not None:
        encoder = WithClassifier(encoder, class_embeds, float(loaded.model.logit_scale.detach().exp())).eval()
    names = output_names(options.with_kept_indices, class_embeds is not None)
    h, w = encoder.image_size
    tmpdir = Path(tempfile.mkdtemp(prefix=".prtool-export-", dir=out.parent))
    try:
        tmp_onnx = tmpdir / out.name
        example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        trace_to_onnx(encoder, example, tmp_onnx, options.opset, options.exporter, names)
        report = None
        if options.validate:
            report = validate_onnx(tmp_onnx, encoder, options.images, batch_size=options.batch_size,
                                   tolerances=options.tolerances, expected_topk=encoder.expected_topk_nodes,
                                   preprocess=loaded.preprocess)
            if not report.passed and not options.allow_failed_validation:
                raise ValidationError(f"validation of the export failed: {report.failure_summary()} "
                                      "(pass --allow-failed-validation to keep the files anyway)", report)
        manifest = build_manifest(loaded, spec, encoder, tmp_onnx, options, names, predictor_meta, report,
                                  extra=extra_manifest)
        manifest_path = out.with_suffix(".json")
        write_json_atomic(tmpdir / manifest_path.name, manifest)
        for f in tmpdir.iterdir():
            os.replace(f, out.parent / f.name)
        return ExportResult(out, manifest_path, manifest, report, encoder)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
