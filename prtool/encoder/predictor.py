"""The lightweight ranking predictor (the paper's Mix-MLP) and its checkpoint format.

Input: the N patch tokens entering the first stage block, ``[B, N, D]`` (no CLS, no prompt
tokens). Output: one score per patch, ``[B, N]``; higher = more important.

A checkpoint is ``NAME.safetensors`` (weights) + ``NAME.json`` (config: model id, rank block,
N, D, hidden sizes, training config and metrics).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from prtool.errors import PrtoolError


@dataclass(frozen=True)
class PredictorConfig:
    num_patches: int
    dim: int
    hidden: int = 64
    token_hidden: int = 32
    channel_hidden: int = 256


class MixerBlock(nn.Module):
    """One MLP-Mixer block on ``[B, N, C]``: token mixing over N, then channel mixing over C."""

    def __init__(self, num_tokens: int, channels: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.token_mlp = nn.Sequential(nn.Linear(num_tokens, token_hidden), nn.GELU(),
                                       nn.Linear(token_hidden, num_tokens))
        self.norm2 = nn.LayerNorm(channels)
        self.channel_mlp = nn.Sequential(nn.Linear(channels, channel_hidden), nn.GELU(),
                                         nn.Linear(channel_hidden, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class RankingPredictor(nn.Module):
    """LayerNorm -> Linear(D, 64) -> MixerBlock -> LayerNorm -> Linear(64, 1): ``[B, N, D] -> [B, N]``."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        self.cfg = cfg
        self.norm_in = nn.LayerNorm(cfg.dim)
        self.embed = nn.Linear(cfg.dim, cfg.hidden)
        self.mixer = MixerBlock(cfg.num_patches, cfg.hidden, cfg.token_hidden, cfg.channel_hidden)
        self.norm_out = nn.LayerNorm(cfg.hidden)
        self.head = nn.Linear(cfg.hidden, 1)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.mixer(self.embed(self.norm_in(patches)))
        return self.head(self.norm_out(x)).squeeze(-1)

    def macs(self) -> int:
        """Multiply-accumulates per image (linear layers; norms and GELU are negligible)."""
        c = self.cfg
        n = c.num_patches
        return (n * c.dim * c.hidden + c.hidden * 2 * n * c.token_hidden + n * 2 * c.hidden * c.channel_hidden
                + n * c.hidden)


def save_predictor(predictor: RankingPredictor, path: Path, meta: dict) -> None:
    """Write weights + JSON config atomically (``path`` ends in .safetensors)."""
    from safetensors.torch import save_file

    from prtool.util.files import follow_umask

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = {"predictor": asdict(predictor.cfg), **meta}
    tmp_w, tmp_j = path.with_name(path.name + ".tmp"), path.with_suffix(".json.tmp")
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, str(tmp_w),
              metadata={"prtool": "predictor"})
    tmp_j.write_text(json.dumps(cfg, indent=2) + "\n")
    follow_umask(tmp_w)
    tmp_w.replace(path)
    tmp_j.replace(path.with_suffix(".json"))


def untrained_predictor(num_patches: int, dim: int) -> RankingPredictor:
    """A predictor with seeded random weights (the same in every process, so an export made with it
    rebuilds identically): a valid graph for export and speed work, not for accuracy."""
    from prtool.encoder.models import RANDOM_INIT_SEED

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return RankingPredictor(PredictorConfig(num_patches, dim)).eval()


def _not_a_predictor(path: Path, meta_path: Path) -> str | None:
    """What ``path`` is instead of a predictor checkpoint, when its files say so."""
    if path.is_dir():
        return "a directory, not a predictor checkpoint: pass the .safetensors file written by `prtool train`"
    if path.suffix != ".safetensors":
        with open(path, "rb") as f:
            head = f.read(8)
        kind = "an ONNX graph" if path.suffix == ".onnx" else "not a safetensors file"
        if len(head) < 8 or int.from_bytes(head, "little") >= (1 << 28):
            return f"{kind}: pass the predictor's .safetensors written by `prtool train`"
    if meta_path.exists():
        try:
            kind = json.loads(meta_path.read_text()).get("kind")
        except (ValueError, AttributeError):
            kind = None
        if kind:
            return (f"not a predictor: {meta_path.name} beside it is a {kind!r} manifest; "
                    "pass the .safetensors written by `prtool train`")
    return None


def load_predictor(path: Path) -> tuple[RankingPredictor, dict]:
    """Read a predictor checkpoint; returns the module and its JSON config."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise PrtoolError(f"predictor {path} does not exist: train one with `prtool train` or pass another file")
    wrong = _not_a_predictor(path, meta_path)
    if wrong:
        raise PrtoolError(f"predictor {path} is {wrong}")
    if not meta_path.exists():
        raise PrtoolError(f"predictor {path} has no config {meta_path.name} beside it: pass the .safetensors written "
                          "by `prtool train` with the .json it wrote beside it")
    try:
        meta = json.loads(meta_path.read_text())
        cfg = PredictorConfig(**meta["predictor"])
    except (ValueError, KeyError, TypeError) as exc:
        raise PrtoolError(f"predictor config {meta_path} is not a prtool predictor config ({type(exc).__name__}: "
                          f"{exc}): pass the .safetensors written by `prtool train`") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise PrtoolError(f"predictor {path} is not a readable safetensors file ({exc})") from None
    predictor = RankingPredictor(cfg)
    try:
        predictor.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise PrtoolError(f"predictor {path} does not match its config ({str(exc).splitlines()[0]})") from None
    return predictor.eval(), meta


def check_predictor_fits(meta: dict, model_id: dict, rank_block: int, num_patches: int, dim: int, path: Path,
                         allow_other_weights: bool = False) -> bool:
    """Refuse a predictor trained for another model, block, N, D or other weights, naming both sides.

    ``allow_other_weights`` lets a predictor trained on other weights of the same architecture
    through (returns False then, for the manifest to record)."""
    from prtool.encoder.models import check_same_weights

    want = {"rank_block": rank_block, "num_patches": num_patches, "dim": dim}
    have = {"rank_block": meta.get("rank_block"), "num_patches": meta["predictor"]["num_patches"],
            "dim": meta["predictor"]["dim"]}
    made_for = meta.get("model_id") or {}
    if made_for.get("model") is not None and made_for["model"] != model_id.get("model"):
        raise PrtoolError(
            f"predictor {path} was trained for model {made_for['model']!r}, not {model_id.get('model')!r}: "
            "train a predictor for this model with `prtool rank` + `prtool train`"
        )
    for key, value in want.items():
        if have[key] is not None and have[key] != value:
            raise PrtoolError(
                f"predictor {path} was trained for {key}={have[key]}, but this model/schedule has {key}={value}: "
                "use a schedule whose first stage is the predictor's rank block, or train a matching predictor"
            )
    return check_same_weights("predictor", path, made_for, model_id, allow_other_weights)
