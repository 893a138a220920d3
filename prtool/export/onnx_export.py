"""Export the (pruned) image encoder to ONNX, validate it, and write its manifest atomically.

``export_onnx(...)`` mirrors ``prtool export``: tests call the function, the CLI only parses.
Nothing appears at the output path unless the export (and, by default, its validation)
succeeded (:func:`prtool.export.artifacts.staged_outputs`).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prtool.encoder.build import EncoderSpec, build_pruned_encoder
from prtool.encoder.models import LoadedModel
from prtool.errors import PrtoolError
from prtool.export.artifacts import check_output_dir, staged_outputs
from prtool.export.io_names import BATCH_AXIS, PIXELS, as_tuple, output_names
from prtool.export.manifest import build_manifest
from prtool.export.validate import Tolerances, ValidationReport, validate_onnx
from prtool.util.files import write_json_atomic

log = logging.getLogger(__name__)

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
        out = as_tuple(self.encoder(pixels))
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


def trace_to_onnx(encoder: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str,
                  names: list[str]) -> None:
    """Run torch.onnx with batch as the only dynamic axis; the result is checked for it."""
    import onnx

    if example.shape[0] < 2:
        raise PrtoolError("export needs an example batch of at least 2 (a batch-1 example can pin the batch axis)")
    with mha_fastpath_disabled(), torch.no_grad():
        if exporter == "torchscript":
            axes = {n: {0: BATCH_AXIS} for n in [PIXELS, *names]}
            torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[PIXELS], output_names=names, dynamic_axes=axes,
                              do_constant_folding=True)
        elif exporter == "dynamo":
            batch = torch.export.Dim(BATCH_AXIS, min=1, max=4096)
            program = torch.onnx.export(encoder, (example,), dynamo=True, opset_version=opset,
                                        input_names=[PIXELS], output_names=names,
                                        dynamic_shapes=({0: batch},), verbose=False)
            program.save(str(path))
        else:
            raise PrtoolError(f"unknown exporter {exporter!r}: use torchscript or dynamo")
        shapes = [tuple(t.shape) for t in as_tuple(encoder(example))]
    model = onnx.load(str(path), load_external_data=False)
    declared = [tuple(example.shape)] + shapes
    for value, shape in zip(list(model.graph.input) + list(model.graph.output), declared):
        dims = value.type.tensor_type.shape.dim
        if not dims[0].dim_param:
            raise PrtoolError(f"the {exporter} exporter fixed the batch axis of {value.name}: this is a bug, please "
                              "report it")
        dims[0].dim_param = BATCH_AXIS
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
    check_output_dir(out)
    encoder, predictor_meta = build_pruned_encoder(loaded, spec, normalize=options.normalize,
                                                   return_indices=options.with_kept_indices,
                                                   visual_prompts=visual_prompts)
    if not encoder.method.exportable:
        raise PrtoolError(f"method {encoder.method.name} cannot be exported: {encoder.method.why_not_exported}")
    if class_embeds is not None:
        encoder = WithClassifier(encoder, class_embeds, float(loaded.model.logit_scale.detach().exp())).eval()
    names = output_names(options.with_kept_indices, class_embeds is not None)
    h, w = encoder.image_size
    with staged_outputs(out) as tmpdir:
        tmp_onnx = tmpdir / out.name
        example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        trace_to_onnx(encoder, example, tmp_onnx, options.opset, options.exporter, names)
        report = _validate_export(tmp_onnx, encoder, names, spec, options, loaded.preprocess)
        manifest = build_manifest(loaded, spec, encoder, tmp_onnx, options, names, predictor_meta, report,
                                  extra=extra_manifest)
        manifest_path = out.with_suffix(".json")
        write_json_atomic(tmpdir / manifest_path.name, manifest)
    return ExportResult(out, manifest_path, manifest, report, encoder)


def _validate_export(path: Path, encoder, names: list[str], spec: EncoderSpec, options: ExportOptions,
                     preprocess: dict) -> ValidationReport | None:
    """The export's built-in validation; a failure raises unless ``options.allow_failed_validation``."""
    if not options.validate:
        return None
    report = validate_onnx(path, encoder, names, options.images, batch_size=options.batch_size,
                           tolerances=options.tolerances, expected_topk=encoder.expected_topk_nodes,
                           preprocess=preprocess)
    if not options.allow_failed_validation:
        refuse_failed_export(report, spec, "the export")
    return report


def refuse_failed_export(report: ValidationReport, spec: EncoderSpec, subject: str) -> None:
    """Raise a failed export validation's one-line error, carrying what ``prtool export --json`` prints
    (nothing was written); a passed report returns."""
    result = {"onnx": None, "manifest": None, "schedule": spec.schedule.to_string() or "none",
              "keep": list(spec.schedule.keep), "passed": False, "validation": report.to_dict()}
    report.raise_if_failed(subject, "pass --allow-failed-validation to keep the files anyway", result)
