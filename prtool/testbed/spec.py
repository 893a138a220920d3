"""The testbed's definition: class names, synonyms, caption templates and shipped files."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CONFIG_PATH = ASSETS / "testbed.json"
CHECKPOINT_PATH = ASSETS / "testbed.safetensors"
EVAL_ITEMS_PATH = ASSETS / "eval_items.npz"
TRAIN_ITEMS_PATH = ASSETS / "train_items.npz"
VAL_ITEMS_PATH = ASSETS / "val_items.npz"  # held out: Fashion-MNIST test items not in the eval split
PREDICTOR_PATH = ASSETS / "predictor.safetensors"
TOKENS_PATH = ASSETS / "tokens.safetensors"  # learnable tokens for the demo schedule (`prtool tune`)
REFERENCE_PATH = ASSETS / "reference.json"
MODEL_NAME = "testbed"
DEMO_KEEP_RATIO, DEMO_STAGES = 0.6, 4  # the demo's operating point, also the worked example in export/CONTRACT.md

CLASSNAMES = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Every class has 3-4 names; captions draw from all of them, zero-shot prompts average them.
SYNONYMS = (
    ("t-shirt", "top", "tee", "t-shirt top"),
    ("trouser", "pants", "trousers", "jeans"),
    ("pullover", "sweater", "jumper"),
    ("dress", "gown", "frock"),
    ("coat", "jacket", "overcoat"),
    ("sandal", "flip-flop", "open shoe"),
    ("shirt", "blouse", "button-up shirt"),
    ("sneaker", "trainer", "running shoe", "sports shoe"),
    ("bag", "handbag", "purse", "tote"),
    ("ankle boot", "boot", "bootie"),
)

TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a {}.",
    "an image of a {}.",
    "a cluttered photo of a {}.",
    "a small {}.",
    "a large {}.",
    "a grey {}.",
    "a photo of the {}.",
    "a {} among clutter.",
    "a close-up photo of a {}.",
    "a product photo of a {}.",
)


def class_captions() -> list[list[str]]:
    """All captions of each class: templates x synonyms."""
    return [[t.format(name) for t in TEMPLATES for name in names] for names in SYNONYMS]


def demo_scorer() -> tuple[str, Path | None]:
    """The committed predictor when it exists, else CLS attention."""
    if PREDICTOR_PATH.exists():
        return "predictor", PREDICTOR_PATH
    return "cls-attn", None
