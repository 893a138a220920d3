"""The rankings store: shards of golden rankings, written atomically, resumable, distributable.

Layout of ``OUT/``::

    plan.json              the run's configuration (written first; a different configuration is refused)
    shard-00000.safetensors  rankings int16 [n, N], importance float32 [n, N], sample_index int64 [n];
                             metadata: sample ids (JSON)
    ...
    index.json             the plan plus the shard list (written last, by rank 0)

Safetensors files are byte-deterministic (no timestamps), so a resumed run ends byte-identical to
an uninterrupted one. Under ``torchrun`` rank r computes shards r, r + P, r + 2P, ...
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prtool.errors import PrtoolError
from prtool.manifest import write_json_atomic
from prtool.progress import progress_bar

log = logging.getLogger(__name__)
STORE_VERSION = 1


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    initialized: bool = False

    def barrier(self) -> None:
        if self.initialized:
            torch.distributed.barrier()


def init_distributed() -> DistInfo:
    """Join the process group when launched by ``torchrun`` (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), True)


def write_plan(out: Path, plan: dict, rank: int) -> None:
    """Create ``plan.json`` or check that an existing one has the same configuration."""
    path = out / "plan.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != plan:
            diff = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
            raise PrtoolError(
                f"{out} holds rankings made with another configuration (differs in {', '.join(diff)}): "
                "use a new --out directory or delete this one"
            )
        return
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan)


def write_shard(path: Path, rankings: np.ndarray, importance: np.ndarray, sample_index: np.ndarray, ids: list[str]) -> None:
    from safetensors.numpy import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    save_file({"rankings": np.ascontiguousarray(rankings, dtype=np.int16),
               "importance": np.ascontiguousarray(importance, dtype=np.float32),
               "sample_index": np.ascontiguousarray(sample_index, dtype=np.int64)},
              str(tmp), metadata={"ids": json.dumps(ids)})
    os.replace(tmp, path)


def compute_store(ranker, dataset, preprocess: dict, out: Path, plan: dict, shard_size: int = 256,
                  skip_bad: bool = False, quiet: bool = False) -> dict:
    """Rank every image of ``dataset`` into ``out`` (resuming at missing shards)."""
    out = Path(out)
    dist = init_distributed()
    n = len(dataset)
    num_shards = (n + shard_size - 1) // shard_size
    plan = {**plan, "store_version": STORE_VERSION, "num_images": n, "shard_size": shard_size,
            "num_shards": num_shards, "skip_bad": skip_bad}
    if dist.rank == 0:
        write_plan(out, plan, 0)
    dist.barrier()
    write_plan(out, plan, dist.rank)
    mine = [s for s in range(num_shards) if s % dist.world == dist.rank]
    todo = [s for s in mine if not (out / shard_name(s)).exists()]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d shards already done", len(mine) - len(todo), len(mine))
    t0, done = time.perf_counter(), 0
    with progress_bar(sum(min(shard_size, n - s * shard_size) for s in todo), "rank", quiet=quiet) as bar:
        for s in todo:
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            rankings, importance, index, ids = [], [], [], []
            for i in range(lo, hi):
                pixels, labels, ok = dataset.load([i], preprocess, skip_bad=skip_bad)
                if ok:
                    r, imp = ranker.rank(pixels, int(labels[0]))
                    rankings.append(r)
                    importance.append(imp)
                    index.append(i)
                    ids.append(dataset.sample_id(i))
                done += 1
                bar.update(1, info=f"{done / (time.perf_counter() - t0):.2f} img/s")
            nn = ranker.n
            write_shard(out / shard_name(s), np.stack(rankings) if rankings else np.zeros((0, nn)),
                        np.stack(importance) if importance else np.zeros((0, nn)), np.asarray(index), ids)
    dist.barrier()
    index_doc = {**plan, "shards": [shard_name(s) for s in range(num_shards)]}
    if dist.rank == 0:
        missing = [sh for sh in index_doc["shards"] if not (out / sh).exists()]
        if missing:
            raise PrtoolError(f"{len(missing)} shards are missing after the run (first: {missing[0]}): rerun to resume")
        write_json_atomic(out / "index.json", index_doc)
    dist.barrier()
    return {"out": str(out), "images": n, "shards": num_shards, "computed_shards": len(todo),
            "seconds": round(time.perf_counter() - t0, 2), "images_per_second": done / max(time.perf_counter() - t0, 1e-9),
            "rank": dist.rank, "world": dist.world}


@dataclass
class RankingStore:
    """A finished store read into memory: ``ids[i]`` -> row ``i`` of ``rankings``/``importance``."""

    index: dict
    ids: list[str]
    rankings: np.ndarray
    importance: np.ndarray

    def row_of(self) -> dict[str, int]:
        return {sid: i for i, sid in enumerate(self.ids)}


def load_store(path: Path) -> RankingStore:
    from safetensors import safe_open

    path = Path(path)
    idx_path = path / "index.json"
    if not idx_path.exists():
        hint = " (the run was interrupted: rerun `prtool rank` with the same options to finish it)" if (path / "plan.json").exists() else ""
        raise PrtoolError(f"{path} is not a finished rankings store: index.json is missing{hint}")
    index = json.loads(idx_path.read_text())
    ids, rankings, importance = [], [], []
    for sh in index["shards"]:
        with safe_open(str(path / sh), framework="numpy") as f:
            ids.extend(json.loads(f.metadata()["ids"]))
            rankings.append(f.get_tensor("rankings"))
            importance.append(f.get_tensor("importance"))
    n = index["num_patches"]
    return RankingStore(index, ids, np.concatenate(rankings).reshape(-1, n).astype(np.int64),
                        np.concatenate(importance).reshape(-1, n))
