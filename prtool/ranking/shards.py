"""Shards of a rankings store: written atomically with a checksum of their content, verified on every read.

A shard is a safetensors file: ``rankings`` int16 ``[n, N]``, ``importance`` float32 ``[n, N]`` and
``sample_index`` int64 ``[n]``, with one metadata entry ``shard``: JSON of ``ids`` (the n sample ids),
``skipped`` (ids of unreadable images left out with ``--skip-bad``) and ``content_sha256`` (sha256 of the
ids and of the tensors' bytes). One entry, because safetensors writes several in a random order and shards
must be byte-deterministic. Shards from before checksums hold ``ids`` alone. So a shard checks itself even
before an index records it (a run interrupted and resumed elsewhere). The index records each file's sha256 and size
(:func:`shard_entry`); a file that matches its entry is the file that was written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TENSORS = {"rankings": np.int16, "importance": np.float32, "sample_index": np.int64}


class CorruptShard(Exception):
    """A shard that is missing or not what was written; ``str(exc)`` says why."""


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def shard_entry(name: str, data: bytes) -> dict:
    """What the index records of a shard file: its name, size and sha256."""
    return {"file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def content_digest(tensors: dict[str, np.ndarray], ids_json: str, skipped_json: str) -> str:
    """sha256 of a shard's ids and tensors (dtype, shape and bytes), independent of the file layout."""
    h = hashlib.sha256(f"{ids_json}\0{skipped_json}\0".encode())
    for key in TENSORS:
        arr = np.ascontiguousarray(tensors[key])
        h.update(f"{key}:{arr.dtype.str}:{arr.shape};".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def write_shard(path: Path, rankings: np.ndarray, importance: np.ndarray, sample_index: np.ndarray,
                ids: list[str], skipped: list[str] = ()) -> dict:
    """Write a shard atomically (temporary file, fsync, rename); return its index entry."""
    from safetensors.numpy import save

    tensors = {key: np.ascontiguousarray(arr, dtype=TENSORS[key])
               for key, arr in (("rankings", rankings), ("importance", importance), ("sample_index", sample_index))}
    digest = content_digest(tensors, json.dumps(ids), json.dumps(list(skipped)))
    meta = {"ids": ids, "skipped": list(skipped), "content_sha256": digest}
    data = save(tensors, metadata={"shard": json.dumps(meta)})
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # plain open: the file follows the umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return shard_entry(path.name, data)


@dataclass
class Shard:
    """A verified shard; ``check`` says how: ``sha256`` (matches the index), ``content`` (its own
    checksum) or ``structure`` (a shard from before checksums: shapes, dtypes and permutations only)."""

    entry: dict
    ids: list[str]
    rankings: np.ndarray
    importance: np.ndarray
    sample_index: np.ndarray
    check: str
    skipped: list[str] = field(default_factory=list)


def read_shard(path: Path, num_patches: int, entry: dict | None = None, rows: range | None = None) -> Shard:
    """Read and verify one shard, or raise :class:`CorruptShard` saying what is wrong.

    ``entry`` is the index's record of the file (sha256 and size); without one (a run not finished
    yet, or a store from before checksums) the shard is checked against its own content checksum.
    ``rows`` are the dataset rows the shard covers, when the caller knows them.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptShard("missing") from None
    except OSError as exc:
        raise CorruptShard(f"unreadable: {exc.strerror or exc}") from None
    if entry and "sha256" in entry:
        if len(data) != entry.get("bytes", len(data)):
            raise CorruptShard(f"{len(data)} bytes, the index records {entry['bytes']}")
        got = hashlib.sha256(data).hexdigest()
        if got != entry["sha256"]:
            raise CorruptShard(f"sha256 {got[:12]}... differs from the {entry['sha256'][:12]}... the index records")
    shard = _parse(data, path.name, num_patches, trusted=bool(entry and "sha256" in entry))
    _check_rows(shard, rows)
    return shard


def _parse(data: bytes, name: str, num_patches: int, trusted: bool) -> Shard:
    from safetensors.numpy import load

    try:
        tensors = load(data)
        meta = _metadata(data)
        ids, skipped = meta["ids"], meta.get("skipped", [])
    except Exception as exc:  # any parse failure of a damaged file is a corrupt shard, whatever raised it
        raise CorruptShard(f"not a readable shard ({type(exc).__name__}: {str(exc)[:80]})") from None
    check = "sha256" if trusted else ("content" if "content_sha256" in meta else "structure")
    if check == "content" and content_digest(tensors, json.dumps(ids), json.dumps(skipped)) != meta["content_sha256"]:
        raise CorruptShard("its data does not match the checksum it was written with")
    _check_structure(tensors, ids, num_patches)
    return Shard(shard_entry(name, data), ids, tensors["rankings"], tensors["importance"], tensors["sample_index"],
                 check, skipped)


def _metadata(data: bytes) -> dict:
    """``{"ids": [...], "skipped": [...], "content_sha256": ...}`` (only ``ids`` in a shard from before checksums)."""
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    return json.loads(meta["shard"]) if "shard" in meta else {"ids": json.loads(meta["ids"])}


def _check_structure(tensors: dict, ids: list, num_patches: int) -> None:
    for key, dtype in TENSORS.items():
        if key not in tensors or tensors[key].dtype != dtype:
            raise CorruptShard(f"tensor {key!r} is missing or not {np.dtype(dtype).name}")
    n = len(tensors["sample_index"])
    shape = (n, num_patches)
    if tensors["rankings"].shape != shape or tensors["importance"].shape != shape or len(ids) != n:
        raise CorruptShard(f"inconsistent shapes for {num_patches} patches and {n} images")
    if n and not (np.sort(tensors["rankings"], axis=1) == np.arange(num_patches)).all():
        raise CorruptShard("a ranking is not a permutation of the patches")
    if not np.isfinite(tensors["importance"]).all():
        raise CorruptShard("non-finite importance")


def _check_rows(shard: Shard, rows: range | None) -> None:
    if rows is None:
        return
    idx = shard.sample_index
    if len(idx) + len(shard.skipped) != len(rows) or (len(idx) and (idx.min() < rows.start or idx.max() >= rows.stop)):
        raise CorruptShard(f"holds other images than rows {rows.start}..{rows.stop - 1} of the dataset")
