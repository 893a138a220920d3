"""The rankings store: shards of golden rankings, written atomically, verified, resumable, distributable.

Layout of ``OUT/``::

    plan.json                the run's configuration (a different one is refused once the store holds shards)
    shard-00000.safetensors  rankings int16 [n, N], importance float32 [n, N], sample_index int64 [n],
    ...                      sample ids and a checksum of all that (:mod:`prtool.ranking.shards`)
    index.json               the plan plus each shard's file name, size and sha256 (written last, by rank 0)
    .lock                    while a ``prtool rank`` writes the store (:mod:`prtool.ranking.lock`)

A run verifies every shard it does not write itself (against index.json, or against the shard's own
checksum) and recomputes a missing or corrupt one. Safetensors files are byte-deterministic (no
timestamps), so a resumed or repaired store ends byte-identical to an uninterrupted run. Readers
(:func:`load_store`) verify every shard and name the command that repairs the store. Under
``torchrun`` rank r computes shards r, r + P, r + 2P, ...; rank 0 holds the lock for the job.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.ranking.lock import StoreLock
from prtool.ranking.shards import CorruptShard, read_shard, shard_name, write_shard
from prtool.util.files import write_json_atomic
from prtool.util.progress import progress_bar

log = logging.getLogger(__name__)
STORE_VERSION = 2  # 2: shard checksums in the index and in each shard; 1: a list of shard names
NOT_IDENTITY = ("store_version", "skip_bad")  # plan keys that do not change the rankings (v1 recorded skip_bad)
# The default shard is about SHARD_SECONDS_2CPU of work on 2 CPU cores at CPU_MACS_PER_SECOND. Measured (fp32,
# CPU time of `prtool rank`, stride 1): the testbed ~25e9 MAC/s on 2 cores (width 128), ViT-B/16 ~120e9
# (width 768): 256 testbed images (~7 min) or 4 ViT-B/16 images (~1.2 min) per shard.
SHARD_SECONDS_2CPU = 180
CPU_MACS_PER_SECOND = 60e9
MAX_SHARD_SIZE = 256


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    initialized: bool = False

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()

    def share(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if not self.initialized:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.initialized:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_rank0(self, fn):
        """Run ``fn`` on rank 0 and share its result; a user error there is raised on every rank."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except PrtoolError as exc:
                error = str(exc)
        result, error = self.share((result, error))
        if error:
            raise PrtoolError(error)
        return result


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), True)


def default_shard_size(macs_per_image: float) -> int:
    """Images per shard: about :data:`SHARD_SECONDS_2CPU` of work on 2 CPU cores (a power of two, 1..256)."""
    images = SHARD_SECONDS_2CPU * CPU_MACS_PER_SECOND / max(macs_per_image, 1.0)
    size = 1
    while size * 2 <= min(images, MAX_SHARD_SIZE):
        size *= 2
    return size


def read_plan(out: Path) -> dict | None:
    path = out / "plan.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON: writing it again", path)
        return None


def settle_plan(out: Path, plan: dict) -> None:
    """Write ``plan.json``, or check that the existing one has the same configuration.

    A store that holds no shard yet takes the new plan (nothing is lost); a store from an older
    prtool whose plan differs only in bookkeeping keys is upgraded.
    """
    old = read_plan(out)
    if old == plan:
        return
    if old is not None:
        same = ({k: v for k, v in old.items() if k not in NOT_IDENTITY}
                == {k: v for k, v in plan.items() if k not in NOT_IDENTITY})
        diff = sorted(k for k in set(old) | set(plan) if k not in NOT_IDENTITY and old.get(k) != plan.get(k))
        if not same and any(out.glob("shard-*.safetensors")):
            raise PrtoolError(f"{out} holds rankings made with another configuration (differs in {', '.join(diff)}): "
                              "use a new --out directory or delete this one")
        if not same:
            log.info("%s holds no shards yet: replacing its plan (it differed in %s)", out, ", ".join(diff))
            (out / "index.json").unlink(missing_ok=True)
    write_json_atomic(out / "plan.json", plan)


def _previous_entries(out: Path) -> dict[str, dict]:
    """The shard entries of an existing index.json (file name -> entry; no checksums in a version-1 store)."""
    path = out / "index.json"
    if not path.exists():
        return {}
    try:  # a damaged index (not JSON, no shard list, an entry that is no file name) verifies nothing
        entries = [s if isinstance(s, dict) else {"file": s} for s in json.loads(path.read_text())["shards"]]
        return {e["file"]: e for e in entries if "file" in e}
    except (ValueError, KeyError, TypeError):
        log.warning("%s is unreadable: every shard is checked against its own checksum instead", path)
        return {}


def _entry(shard) -> dict:
    return {**shard.entry, "skipped": shard.skipped} if shard.skipped else shard.entry


def verify_shards(out: Path, shards: list[int], previous: dict[str, dict],
                  plan: dict) -> tuple[dict[int, dict], list[int]]:
    """Split ``shards`` into verified ones (shard -> index entry) and those to compute, saying why for each."""
    good, todo = {}, []
    for s in shards:
        name = shard_name(s)
        try:
            good[s] = _entry(read_shard(out / name, plan["num_patches"], previous.get(name), _rows(plan, s)))
        except CorruptShard as exc:
            todo.append(s)
            if str(exc) != "missing":
                log.warning("%s is corrupt (%s): recomputing it", out / name, exc)
            elif previous:
                log.warning("%s is missing: recomputing it", out / name)
    return good, todo


def _rows(plan: dict, s: int) -> range:
    size = plan["shard_size"]
    return range(s * size, min(plan["num_images"], (s + 1) * size))


def unreadable_images(dataset, rows: list[int]) -> list[tuple[str, str]]:
    """``(path, reason)`` for every image among ``rows`` that does not decode (nothing for in-memory datasets)."""
    from PIL import Image

    if dataset.arrays is not None:
        return []
    bad = []
    with progress_bar(len(rows), "decode-check", unit="images") as bar:
        for i in rows:
            path = dataset.samples[i][0]
            try:
                with Image.open(path) as img:
                    img.load()
            except Exception as exc:  # noqa: BLE001 - PIL raises many types for a damaged file; all mean "unreadable"
                bad.append((str(path), f"{type(exc).__name__}: {exc}"))
            bar.update(1)
    return bad


def unreadable_error(bad: list[tuple[str, str]], shards_kept: bool) -> PrtoolError:
    """The one-line error for unreadable images, suggesting only recoveries that resume from here."""
    what = f"image {bad[0][0]} cannot be decoded ({bad[0][1]})" if len(bad) == 1 else \
        f"{len(bad)} images cannot be decoded (first: {bad[0][0]}: {bad[0][1]})"
    fix = ("replace it with a readable copy of the same name, or rerun with --skip-bad to leave it out; "
           "the finished shards are kept either way") if shards_kept else \
        "remove or replace the file(s) and rerun, or rerun with --skip-bad to leave them out"
    return PrtoolError(f"{what}: {fix}")


def rank_command(argv: list[str]) -> str:
    """``prtool rank ...`` as typed, without the store path and output-only flags (the index records it)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("-o", "--out"):
            skip = True
        elif not (a.startswith("--out=") or (a.startswith("-o") and not a.startswith("--"))
                  or a in ("-q", "--quiet", "--json", "-v", "--verbose")):
            out.append(a)
    return shlex.join(["prtool", *out])


def compute_store(ranker, dataset, preprocess: dict, out: Path, plan: dict, shard_size: int | None = None,
                  skip_bad: bool = False, quiet: bool = False, command: str | None = None) -> dict:
    """Rank every image of ``dataset`` into ``out``: verify what exists, compute what is missing or corrupt.

    ``shard_size`` None: the existing store's, else :func:`default_shard_size`. ``command`` is the
    ``prtool rank`` line readers suggest to repair the store.
    """
    out = Path(out)
    dist = init_distributed()
    lock = StoreLock(out)
    try:
        dist.on_rank0(lambda: (_make_dir(out), lock.acquire()))
        return _fill_store(dist, ranker, dataset, preprocess, out, plan, shard_size, skip_bad, quiet, command)
    finally:
        lock.release()


def _make_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PrtoolError(f"cannot create the store directory {out}: {exc.strerror or exc}") from None


def _fill_store(dist, ranker, dataset, preprocess, out, plan, shard_size, skip_bad, quiet, command) -> dict:
    n = len(dataset)
    size = dist.on_rank0(lambda: shard_size or (read_plan(out) or {}).get("shard_size")
                         or default_shard_size(ranker.macs_per_image()))
    plan = {**plan, "store_version": STORE_VERSION, "num_images": n, "shard_size": size,
            "num_shards": (n + size - 1) // size}
    dist.on_rank0(lambda: settle_plan(out, plan))
    previous = dist.on_rank0(lambda: _previous_entries(out))
    good, todo = verify_shards(out, [s for s in range(plan["num_shards"]) if s % dist.world == dist.rank], previous,
                               plan)
    kept = sum(dist.gather(len(good)))
    bad = [b for part in dist.gather(unreadable_images(dataset,
                                                       [i for s in todo for i in _rows(plan, s)])) for b in part]
    if bad and not skip_bad:
        raise unreadable_error(bad, kept > 0)
    if bad:
        log.warning("%d unreadable images will be left out (--skip-bad; listed in index.json)", len(bad))
    t0 = time.perf_counter()
    total = sum(len(_rows(plan, s)) for s in todo)
    label = "rank" if dist.world == 1 else f"rank (process {dist.rank}/{dist.world})"
    with progress_bar(total, label, quiet=quiet, unit="images") as bar:
        for s in todo:
            good[s] = _rank_shard(ranker, dataset, preprocess, out / shard_name(s), _rows(plan, s), skip_bad, bar)
    entries = {s: e for part in dist.gather(good) for s, e in part.items()}
    computed = sorted(shard_name(s) for part in dist.gather(todo) for s in part)
    dist.on_rank0(lambda: _write_index(out, plan, entries, command))
    seconds = time.perf_counter() - t0
    skipped = [sid for e in entries.values() for sid in e.get("skipped", [])]
    return {"out": str(out), "images": n, "shards": plan["num_shards"], "shard_size": size,
            "computed_shards": len(computed), "computed": computed, "verified_shards": kept,
            "skipped_images": len(skipped), "seconds": round(seconds, 2),
            "images_per_second": total / max(seconds, 1e-9), "rank": dist.rank, "world": dist.world}


def _rank_shard(ranker, dataset, preprocess, path: Path, rows: range, skip_bad: bool, bar) -> dict:
    rankings, importance, index, ids, skipped = [], [], [], [], []
    for i in rows:
        try:
            pixels, labels, ok = dataset.load([i], preprocess, skip_bad=skip_bad)
        except PrtoolError:  # unreadable although it decoded before the run: it changed meanwhile
            raise unreadable_error(unreadable_images(dataset, [i]) or [(dataset.sample_id(i), "unreadable")],
                                   True) from None
        if ok:
            r, imp = ranker.rank(pixels, int(labels[0]))
            rankings.append(r)
            importance.append(imp)
            index.append(i)
            ids.append(dataset.sample_id(i))
        else:
            skipped.append(dataset.sample_id(i))
        bar.update(1)
    nn = ranker.n
    entry = write_shard(path, np.stack(rankings) if rankings else np.zeros((0, nn)),
                        np.stack(importance) if importance else np.zeros((0, nn)), np.asarray(index), ids, skipped)
    return {**entry, "skipped": skipped} if skipped else entry


def _write_index(out: Path, plan: dict, entries: dict[int, dict], command: str | None) -> None:
    missing = [shard_name(s) for s in range(plan["num_shards"]) if s not in entries]
    if missing:
        raise PrtoolError(f"{len(missing)} shards are missing after the run (first: {missing[0]}): rerun to resume")
    doc = {**plan, "shards": [entries[s] for s in range(plan["num_shards"])]}
    if command:
        doc["command"] = command
    write_json_atomic(out / "index.json", doc)


@dataclass
class RankingStore:
    """A finished store read into memory: ``ids[i]`` -> row ``i`` of ``rankings``/``importance``."""

    index: dict
    ids: list[str]
    rankings: np.ndarray
    importance: np.ndarray
    path: Path | None = None  # the store's folder, for messages

    def row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}


def load_store(path: Path) -> RankingStore:
    """Read a finished store, verifying every shard; a missing or corrupt one is a one-line error naming the repair."""
    path = Path(path)
    index = _read_index(path)
    n = index["num_patches"]
    shards = []
    for k, item in enumerate(index["shards"]):
        entry = item if isinstance(item, dict) else {"file": item}
        try:
            shards.append(read_shard(path / entry["file"], n, entry, _rows(index, k)))
        except CorruptShard as exc:
            state = "missing" if str(exc) == "missing" else f"corrupt ({exc})"
            raise PrtoolError(f"rankings shard {path / entry['file']} is {state}: {repair_hint(path, index)}") from None
    if any(sh.check == "structure" for sh in shards):
        log.warning("%s was written before shard checksums: its shards were checked for structure only; rerun the "
                    "`prtool rank` that made it (same options, -o %s) to record their checksums", path, path)
    ids = [sid for sh in shards for sid in sh.ids]
    return RankingStore(index, ids, np.concatenate([sh.rankings for sh in shards]).reshape(-1, n).astype(np.int64),
                        np.concatenate([sh.importance for sh in shards]).reshape(-1, n), path)


def _read_index(path: Path) -> dict:
    idx_path = path / "index.json"
    if not idx_path.exists():
        hint = ""
        if (path / "plan.json").exists():
            hint = " (the run was interrupted: rerun `prtool rank` with the same options to finish it)"
        raise PrtoolError(f"{path} is not a finished rankings store: index.json is missing{hint}")
    try:
        index = json.loads(idx_path.read_text())
        index["shards"], index["num_patches"], index["shard_size"]  # noqa: B018 - the keys every reader needs
    except (ValueError, KeyError, TypeError) as exc:
        raise PrtoolError(f"{idx_path} is corrupt ({type(exc).__name__}): {repair_hint(path, {})}") from None
    if index.get("store_version", 1) > STORE_VERSION:
        raise PrtoolError(f"{path} was written by a newer prtool (store version {index['store_version']}): upgrade "
                          "prtool")
    return index


def repair_hint(path: Path, index: dict) -> str:
    """How to repair a store: its own `prtool rank` line when the index recorded it."""
    if index.get("command"):
        return f"repair it with `{index['command']} -o {shlex.quote(str(path))}` (recomputes only what is bad)"
    return (f"repair it by rerunning the `prtool rank` that made it with -o {path} and the same options "
            f"(recorded in {path / 'plan.json'}); only what is bad is recomputed")
