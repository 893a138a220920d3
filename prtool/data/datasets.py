"""Datasets every command reads: the testbed, ImageFolder, CSV manifests, CoOp split JSON.

``--data`` takes ``testbed`` (the shipped splits), a folder (one sub-folder per class), a ``.csv``
(``path,label[,classname]``, paths relative to the CSV or ``--image-root``) or a CoOp/Dassl split
``.json`` (``{"train": [[relpath, label, classname], ...], "val": ..., "test": ...}`` with
``--image-root``). Images are preprocessed as the model's own config says.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from prtool.data.images import IMAGE_SUFFIXES, arrays_to_batch, preprocess_image, read_image
from prtool.data.zeroshot import DEFAULT_TEMPLATES
from prtool.errors import PrtoolError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


@dataclass
class ImageDataset:
    """``samples[i] = (source, label)``; a source is a Path, or an int row of ``arrays``."""

    name: str
    split: str
    classnames: list[str]
    class_prompts: list[list[str]]
    samples: list[tuple[object, int]]
    arrays: np.ndarray | None = None
    skipped: list[str] = field(default_factory=list)
    synonyms: list[list[str]] | None = None  # names per class (first = classname); None: the classname alone
    notes: list[str] = field(default_factory=list)  # what a command must tell the user (e.g. no splits)

    @property
    def class_synonyms(self) -> list[list[str]]:
        return self.synonyms or [[c.replace("_", " ")] for c in self.classnames]

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> np.ndarray:
        return np.array([lab for _, lab in self.samples], dtype=np.int64)

    def subset(self, indices) -> ImageDataset:
        return ImageDataset(self.name, self.split, self.classnames, self.class_prompts,
                            [self.samples[int(i)] for i in indices], self.arrays, synonyms=self.synonyms,
                            notes=self.notes)

    def limit(self, n: int | None) -> ImageDataset:
        return self if n is None or n >= len(self) else self.subset(range(n))

    def sample_id(self, i: int) -> str:
        src = self.samples[i][0]
        return f"{self.split}/{src}" if isinstance(src, (int, np.integer)) else str(src)

    def fingerprint(self) -> str:
        """Hash of the split's ids and labels: detects a store computed on other data."""
        h = hashlib.sha256(f"{self.name}|{self.split}".encode())
        for i, (_, lab) in enumerate(self.samples):
            h.update(f"{self.sample_id(i)}:{lab};".encode())
        return h.hexdigest()[:16]

    def load(self, indices, preprocess: dict, skip_bad: bool = False) -> tuple[torch.Tensor, np.ndarray, list[int]]:
        """Preprocessed ``[b, 3, H, W]`` pixels, labels and the indices actually loaded."""
        idx = [int(i) for i in indices]
        if self.arrays is not None:
            rows = [self.samples[i][0] for i in idx]
            return arrays_to_batch(self.arrays[rows], preprocess), self.labels[idx], idx
        pixels, ok = [], []
        for i in idx:
            try:
                pixels.append(preprocess_image(read_image(self.samples[i][0]), preprocess))
                ok.append(i)
            except PrtoolError:
                if not skip_bad:
                    raise
                self.skipped.append(str(self.samples[i][0]))
                log.warning("skipping unreadable image %s", self.samples[i][0])
        if not pixels:
            return torch.empty(0), np.empty(0, dtype=np.int64), []
        return torch.stack(pixels), self.labels[ok], ok

    def batches(self, batch_size: int, preprocess: dict, skip_bad: bool = False):
        """Yield ``(pixels, labels, rows)``; rows are the dataset indices actually loaded."""
        for start in range(0, len(self), batch_size):
            pixels, labels, rows = self.load(range(start, min(start + batch_size, len(self))), preprocess, skip_bad)
            if len(labels):
                yield pixels, labels, rows


def few_shot(dataset: ImageDataset, shots: int, seed: int = 0) -> ImageDataset:
    """At most ``shots`` samples per class, drawn with a seeded generator (CoOp-style)."""
    rng = np.random.default_rng(seed)
    labels = dataset.labels
    picked = []
    for c in range(len(dataset.classnames)):
        members = np.flatnonzero(labels == c)
        picked.extend(rng.choice(members, size=min(shots, len(members)), replace=False).tolist())
    return dataset.subset(sorted(picked))


def read_templates(templates_file: Path | None, name: str = "") -> list[str] | None:
    """The prompt templates of a JSON file (a list, or {dataset: list}); None without a file."""
    if templates_file is None:
        return None
    try:
        data = json.loads(Path(templates_file).read_text())
    except (OSError, ValueError) as exc:
        raise PrtoolError(f"cannot read templates file {templates_file}: {str(exc).splitlines()[0][:100]}") from None
    templates = data.get(name, data.get("default")) if isinstance(data, dict) else data
    if not templates or not isinstance(templates, list) or not all(isinstance(t, str) and "{}" in t for t in templates):
        raise PrtoolError(f"templates file {templates_file} must give a list of strings containing '{{}}'")
    return templates


def prompts_for(classnames: list[str], templates_file: Path | None = None, name: str = "") -> list[list[str]]:
    """Prompt lists per class: ``templates_file`` (JSON: a list, or {dataset: list}) or the defaults."""
    templates = read_templates(templates_file, name) or list(DEFAULT_TEMPLATES)
    return [[t.format(c.replace("_", " ")) for t in templates] for c in classnames]


TESTBED_DOMAINS = {"testbed": "", "testbed-sketch": "sketch"}  # --data name -> rendering domain


def _testbed(split: str, name: str = "testbed", templates: list[str] | None = None) -> ImageDataset:
    from prtool.testbed import spec
    from prtool.testbed.eval_set import load_split_canvases

    canvases, labels = load_split_canvases(split, domain=TESTBED_DOMAINS[name])
    syn = [list(s) for s in spec.SYNONYMS]
    prompts = [[t.format(n) for t in (templates or spec.TEMPLATES) for n in names] for names in syn]
    return ImageDataset(name, split, list(spec.CLASSNAMES), prompts,
                        [(i, int(lab)) for i, lab in enumerate(labels)], canvases, synonyms=syn)


def _split_folders(root: Path) -> list[str]:
    """The split folders (train/val/test holding class folders) of an ImageFolder root."""
    return [s for s in SPLITS if (root / s).is_dir() and any(d.is_dir() for d in (root / s).iterdir())]


def _image_folder(root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]], list[str]]:
    """``root/<split>/<class>/`` (the ImageNet layout) or a flat ``root/<class>/`` tree, which has no
    splits (every --split reads the same images: said in a note). A folder of images without
    sub-folders is an unlabelled dataset."""
    notes = []
    splits = _split_folders(root)
    if splits:
        if split not in splits:
            raise PrtoolError(f"dataset {root} has no {split!r} split (it has {', '.join(splits)}): "
                              f"pass --split {splits[0]}" + (" or another of those" if len(splits) > 1 else ""))
        base = root / split
    else:
        base = root
        notes.append(f"dataset {root} is a flat class-folder tree without train/val/test folders: every --split "
                     "reads the same images, so rankings, training and evaluation are not held out from each other")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    if not classes:
        files = sorted(p for p in base.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [], [(p, -1) for p in files], notes
    samples = [(p, c) for c, name in enumerate(classes) for p in sorted((base / name).rglob("*"))
               if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return classes, samples, notes


def _csv(path: Path, root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    names: dict[int, str] = {}
    samples = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or (lineno == 1 and row[0].strip().lower() == "path"):
                continue
            try:
                label = int(row[1]) if len(row) > 1 and row[1].strip() else -1
            except ValueError:
                raise PrtoolError(f"{path}:{lineno}: expected 'path,label[,classname]', got {row!r}") from None
            if len(row) > 2 and row[2].strip():
                names[label] = row[2].strip()
            samples.append((root / row[0].strip(), label))
    n = max((lab for _, lab in samples), default=-1) + 1
    return [names.get(i, str(i)) for i in range(n)], samples


def _coop(path: Path, root: Path, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise PrtoolError(f"{path} is not valid JSON ({exc})") from None
    if split not in data:
        raise PrtoolError(f"{path} has no {split!r} split (it has {', '.join(data)})")
    names: dict[int, str] = {}
    samples = []
    for entry in data[split]:
        rel, label, cname = entry[0], int(entry[1]), str(entry[2])
        names[label] = cname
        samples.append((root / rel, label))
    for other in SPLITS:  # class names from every split, so label ids stay complete
        for entry in data.get(other, []):
            names.setdefault(int(entry[1]), str(entry[2]))
    n = max(names, default=-1) + 1
    return [names.get(i, str(i)) for i in range(n)], samples


def load_dataset(data: str, split: str = "test", image_root: Path | None = None,
                 templates_file: Path | None = None) -> ImageDataset:
    """Resolve ``--data`` into an :class:`ImageDataset`."""
    if split not in SPLITS:
        raise PrtoolError(f"unknown split {split!r}: use train, val or test")
    if data in TESTBED_DOMAINS:
        return _testbed(split, data, read_templates(templates_file, data))
    path = Path(data)
    if not path.exists():
        raise PrtoolError(f"dataset {data} does not exist: pass 'testbed' (or 'testbed-sketch'), a class-folder "
                          "directory, a .csv or a CoOp .json")
    root = Path(image_root) if image_root else path.parent
    notes: list[str] = []
    if path.is_dir():
        classes, samples, notes = _image_folder(path, split)
    elif path.suffix.lower() == ".csv":
        classes, samples = _csv(path, root)
    elif path.suffix.lower() == ".json":
        classes, samples = _coop(path, root, split)
    else:
        raise PrtoolError(f"dataset {data}: unknown format (use a directory, a .csv or a CoOp split .json)")
    if not samples:
        raise PrtoolError(f"dataset {data} ({split}) holds no images")
    missing = [str(p) for p, _ in samples[:1000] if not Path(p).exists()]
    if missing:
        raise PrtoolError(f"dataset {data}: image {missing[0]} does not exist (check --image-root)")
    for note in notes:
        log.warning("note: %s", note)
    return ImageDataset(path.stem, split, classes, prompts_for(classes, templates_file, path.stem), samples,
                        notes=notes)
