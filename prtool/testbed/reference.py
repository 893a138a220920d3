"""The testbed's regression anchor: the committed checkpoint's hash and its embedding of eval canvas 0
(``assets/reference.json``), written after ``prtool testbed train`` and checked by the tests."""

from __future__ import annotations

import json
from pathlib import Path

from prtool.testbed import spec
from prtool.testbed.eval_set import load_split_canvases


def write_reference(checkpoint: Path = spec.CHECKPOINT_PATH, out: Path = spec.REFERENCE_PATH) -> dict:
    """Record the checkpoint's hash and its embedding of eval canvas 0 (a regression anchor for tests)."""
    import torch

    from prtool.data.images import arrays_to_batch
    from prtool.encoder.models import load_clip

    loaded = load_clip(spec.MODEL_NAME, str(checkpoint))
    canvases, labels = load_split_canvases("test", limit=1)
    with torch.no_grad():
        emb = loaded.model.encode_image(arrays_to_batch(canvases, loaded.preprocess), normalize=True)[0]
    ref = {"checkpoint_sha256": loaded.checkpoint_sha256, "image": "testbed test canvas 0", "label": int(labels[0]),
           "embedding": [round(float(v), 7) for v in emb]}
    tmp = Path(out).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(ref, indent=1) + "\n")
    tmp.replace(out)
    return ref
