"""The names of the exported graphs' inputs and outputs: the I/O contract, declared once.

Image encoder: ``pixel_values`` float32 ``[batch, 3, H, W]`` in; ``image_embeds`` float32
``[batch, E]``, optionally ``kept_patch_indices`` int64 ``[batch, k]`` and ``logits`` float32
``[batch, C]`` out. Text encoder: ``input_ids`` int64 ``[batch, context]`` in, ``text_embeds``
float32 ``[batch, E]`` out.
"""

from __future__ import annotations

PIXELS = "pixel_values"
EMBEDS = "image_embeds"
KEPT_INDICES = "kept_patch_indices"
LOGITS = "logits"
TEXT_IDS = "input_ids"
TEXT_EMBEDS = "text_embeds"
BATCH_AXIS = "batch"


def output_names(with_indices: bool, with_logits: bool = False) -> list[str]:
    """The image encoder's outputs, in the order the graph (and the PyTorch module) returns them."""
    return [EMBEDS] + ([KEPT_INDICES] if with_indices else []) + ([LOGITS] if with_logits else [])


def as_tuple(out) -> tuple:
    """A module's outputs as a tuple (an encoder returns one tensor, or a tuple with the kept indices)."""
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)
