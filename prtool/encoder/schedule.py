"""Pruning schedules: which blocks see a reduced sequence, and how many patch tokens they keep.

A schedule is a tuple of stages ``(block, removed)``; ``block`` is the 0-based index of the first
block that sees the reduced sequence. Every k is a Python int fixed when the model is built, so
every shape in the exported graph is static except the batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prtool.errors import PrtoolError

_STAGE = re.compile(r"^\s*(\d+)\s*:\s*(-?\d+)\s*$")


@dataclass(frozen=True)
class Schedule:
    """Stages ``((block, removed), ...)`` for an encoder of ``depth`` blocks and ``num_patches`` patches."""

    stages: tuple[tuple[int, int], ...]
    num_patches: int
    depth: int

    def __post_init__(self):
        prev = -1
        kept = self.num_patches
        for block, removed in self.stages:
            if not isinstance(block, int) or not isinstance(removed, int):
                raise PrtoolError(f"schedule stage {block}:{removed}: block and count must be integers")
            if block < 0 or block >= self.depth:
                raise PrtoolError(
                    f"schedule stage {block}:{removed}: block {block} is outside 0..{self.depth - 1} "
                    f"(the encoder has {self.depth} blocks)"
                )
            if block <= prev:
                raise PrtoolError(f"schedule blocks must increase strictly: {block} follows {prev}")
            if removed <= 0:
                raise PrtoolError(f"schedule stage {block}:{removed}: each stage must remove at least one token")
            kept -= removed
            if kept <= 0:
                raise PrtoolError(
                    f"schedule removes {self.num_patches - kept} of {self.num_patches} patch tokens by block {block}: "
                    "at least one patch token must be kept"
                )
            prev = block

    @property
    def is_empty(self) -> bool:
        return not self.stages

    @property
    def keep(self) -> tuple[int, ...]:
        """Patch tokens kept from each stage on (``k_j``)."""
        out, kept = [], self.num_patches
        for _, removed in self.stages:
            kept -= removed
            out.append(kept)
        return tuple(out)

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(b for b, _ in self.stages)

    @property
    def first_block(self) -> int | None:
        return self.stages[0][0] if self.stages else None

    @property
    def final_keep(self) -> int:
        return self.keep[-1] if self.stages else self.num_patches

    def tokens_per_block(self, num_prefix: int = 1) -> list[int]:
        """Sequence length (prefix tokens included) entering each of the ``depth`` blocks."""
        n, out, stage = self.num_patches, [], dict(zip(self.blocks, self.keep))
        for b in range(self.depth):
            n = stage.get(b, n)
            out.append(n + num_prefix)
        return out

    def to_string(self) -> str:
        return ",".join(f"{b}:{r}" for b, r in self.stages)

    def to_dict(self) -> dict:
        return {
            "stages": [{"block": b, "removed": r, "keep": k} for (b, r), k in zip(self.stages, self.keep)],
            "string": self.to_string(),
            "num_patches": self.num_patches,
            "depth": self.depth,
            "final_keep": self.final_keep,
            "removed_fraction": round(1 - self.final_keep / self.num_patches, 4),
        }


def parse_schedule(text: str, num_patches: int, depth: int) -> Schedule:
    """Parse ``"3:20,5:20,7:20,9:20"`` (block:removed); ``""`` or ``"none"`` is the empty schedule."""
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        return Schedule((), num_patches, depth)
    stages = []
    for part in text.split(","):
        m = _STAGE.match(part)
        if not m:
            raise PrtoolError(
                f"malformed schedule stage {part.strip()!r} in {text!r}: write block:removed pairs such as '3:20,5:20'"
            )
        stages.append((int(m.group(1)), int(m.group(2))))
    return Schedule(tuple(stages), num_patches, depth)


def default_first_block(depth: int) -> int:
    """About a third of the way in: block 3 of 12 (the paper's layer 4), 1 of 6, 7 of 24."""
    return max(1, round(depth / 3) - 1)


def derive_schedule(keep_ratio: float, stages: int, num_patches: int, depth: int,
                    first_block: int | None = None) -> Schedule:
    """A schedule keeping ``round(keep_ratio * N)`` patches after ``stages`` evenly spaced stages.

    Stages are spaced by ``(depth - 1 - first) // stages`` blocks (at least 1); the removal is split
    evenly, the remainder going to the earliest stages. ``keep_ratio=0.6, stages=4`` on ViT-B/16
    gives ``3:20,5:20,7:19,9:19``.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise PrtoolError(f"--keep-ratio {keep_ratio} must be in (0, 1]")
    if stages < 1:
        raise PrtoolError(f"--stages {stages} must be at least 1")
    first = default_first_block(depth) if first_block is None else first_block
    if not 0 <= first < depth:
        raise PrtoolError(f"--first-block {first} is outside 0..{depth - 1}")
    step = max(1, (depth - 1 - first) // stages)
    blocks = [first + i * step for i in range(stages)]
    if blocks[-1] >= depth:
        raise PrtoolError(
            f"{stages} stages starting at block {first} do not fit in {depth} blocks: use fewer --stages "
            "or an earlier --first-block"
        )
    total = num_patches - max(1, round(keep_ratio * num_patches))
    if total == 0:
        return Schedule((), num_patches, depth)
    if total < stages:
        raise PrtoolError(f"keep ratio {keep_ratio} removes {total} tokens, fewer than {stages} stages: use fewer "
                          "--stages")
    base, extra = divmod(total, stages)
    removed = [base + (1 if i < extra else 0) for i in range(stages)]
    return Schedule(tuple(zip(blocks, removed)), num_patches, depth)


def resolve_schedule(schedule: str | None, keep_ratio: float | None, stages: int, first_block: int | None,
                     num_patches: int, depth: int) -> Schedule:
    """The CLI's two syntaxes: an explicit ``--schedule`` string, or ``--keep-ratio`` + ``--stages``."""
    if schedule is not None and keep_ratio is not None:
        raise PrtoolError("pass either --schedule or --keep-ratio, not both")
    if keep_ratio is not None:
        return derive_schedule(keep_ratio, stages, num_patches, depth, first_block)
    return parse_schedule(schedule or "", num_patches, depth)
