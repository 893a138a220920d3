"""``prtool export`` as one library call: :class:`ExportRequest` holds every option of the command (its
fields are the ``[export]`` recipe schema) and :func:`run_export` does the whole export from it.

Adding an option: add the field here (with its default), the Typer parameter of the same name in
``prtool/cli/export_cmd.py``, read it in :func:`run_export`, and give it an effect case in
``tests/test_recipes.py`` (which fails until every field has one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class ExportRequest:
    model: str = "testbed"
    pretrained: str | None = None
    schedule: str | None = None
    keep_ratio: float | None = None
    stages: int = 1
    first_block: int | None = None
    scorer: str = "predictor"
    predictor: Path | None = None
    out: Path = Path("runs/export/model.onnx")
    opset: int = 18
    exporter: str = "torchscript"
    gather: str = "flat"
    no_normalize: bool = False
    with_kept_indices: bool = False
    no_prune: bool = False
    no_validate: bool = False
    allow_failed_validation: bool = False
    images: Path | None = None
    batch_size: int = 7
    atol: float | None = None
    rtol: float | None = None
    tokens: Path | None = None
    classifier: bool = False
    data: str | None = None
    allow_other_weights: bool = False
    quantize: str | None = None  # int8-dynamic, int8-qdq or fp16 (prtool.export.quantize)
    calib_data: str | None = None
    calib_split: str = "train"
    calib_images: int = 64
    calib_seed: int = 0

    def quantize_options(self):
        """The :class:`prtool.export.quantize.QuantizeOptions` of ``--quantize`` (checked), or None."""
        if self.quantize is None:
            return None
        from prtool.export.quantize import QuantizeOptions

        qopts = QuantizeOptions(self.quantize, self.calib_data, self.calib_split, self.calib_images, self.calib_seed)
        qopts.check()
        return qopts

    def check_quantize(self) -> None:
        """Refuse a bad ``--quantize``/``--calib-*`` before any work (one line, nothing written)."""
        self.quantize_options()


def export_summary(sched, result) -> dict:
    """The command's result: where the files went, the schedule, the predictor and the validation report."""
    return {"onnx": str(result.onnx_path), "manifest": str(result.manifest_path),
            "schedule": sched.to_string() or "none", "keep": list(sched.keep),
            "predictor": result.manifest["predictor"], "quantization": result.manifest.get("quantization"),
            "validation": result.report.to_dict() if result.report else None}


def export_options(req: ExportRequest):
    """The library's :class:`~prtool.export.onnx_export.ExportOptions` for a request."""
    from prtool.export.onnx_export import ExportOptions
    from prtool.export.validate import Tolerances

    tol = Tolerances(**{k: v for k, v in (("atol", req.atol), ("rtol", req.rtol)) if v is not None})
    return ExportOptions(opset=req.opset, exporter=req.exporter, normalize=not req.no_normalize,
                         with_kept_indices=req.with_kept_indices, validate=not req.no_validate,
                         allow_failed_validation=req.allow_failed_validation, images=req.images,
                         batch_size=req.batch_size, tolerances=tol)


def _extras(loaded, spec, req: ExportRequest) -> dict:
    """Tokens and a classifier head to bake in (``--tokens``, ``--classifier``, ``--data``)."""
    if req.tokens is None and not req.classifier:
        return {"visual_prompts": None, "class_embeds": None, "manifest": {}}
    from prtool.data.datasets import load_dataset
    from prtool.tuning.tune import export_extras

    dataset = load_dataset(req.data, "test") if req.data else None
    return export_extras(loaded, spec, req.tokens, req.classifier, dataset, req.data)


def run_export(req: ExportRequest) -> tuple[dict, object]:
    """Export as ``req`` says; returns ``(summary, validation report or None)``.

    Raises :class:`~prtool.errors.ValidationError` (carrying the report and the command's ``--json`` result)
    when validation fails and ``allow_failed_validation`` is off; nothing is written then.
    """
    from prtool.encoder.build import EncoderSpec, resolve_predictor, schedule_for
    from prtool.encoder.models import load_clip
    from prtool.export.onnx_export import export_onnx

    loaded = load_clip(req.model, req.pretrained)
    if req.no_prune:
        sched = schedule_for(loaded, "none")
    else:
        sched = schedule_for(loaded, req.schedule, req.keep_ratio, req.stages, req.first_block)
    pred = resolve_predictor(loaded, sched, req.scorer, req.predictor)
    spec = EncoderSpec(sched, req.scorer, pred, req.gather, allow_other_weights=req.allow_other_weights)
    extras = _extras(loaded, spec, req)
    kw = {"visual_prompts": extras["visual_prompts"], "extra_manifest": extras["manifest"],
          "class_embeds": extras["class_embeds"]}
    qopts = req.quantize_options()
    if qopts is not None:
        from prtool.export.quantize import export_quantized

        result = export_quantized(loaded, spec, req.out, export_options(req), qopts, **kw)
    else:
        result = export_onnx(loaded, spec, req.out, export_options(req), **kw)
    return export_summary(sched, result), result.report
