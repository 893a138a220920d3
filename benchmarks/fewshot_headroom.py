"""How much can few-shot labels add over zero-shot on a dataset? A linear-probe check.

Trains a cosine classifier (initialised at the zero-shot class embeddings, the model's logit scale)
on frozen, unpruned image embeddings of k shots per class from the train split, and scores it on
the test split next to zero-shot. When no probe beats zero-shot, the features already hold all the
few shots can say linearly, and tuned tokens can only win by changing the features themselves.

    python benchmarks/fewshot_headroom.py --data testbed --data testbed-sketch \\
        > benchmarks/results/fewshot-headroom-ENV.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from prtool.data.datasets import few_shot, load_dataset
from prtool.data.zeroshot import text_classifier
from prtool.encoder.build import EncoderSpec, build_pruned_encoder, schedule_for
from prtool.encoder.models import load_clip


def embed(enc, dataset, preprocess) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    with torch.no_grad():
        for pixels, labels, *_ in dataset.batches(200, preprocess):
            xs.append(enc(pixels))
            ys.append(torch.as_tensor(labels))
    return torch.cat(xs), torch.cat(ys)


def headroom(loaded, data: str, shots: list[int], steps: int = 300, seed: int = 0) -> dict:
    test, train = load_dataset(data, "test"), load_dataset(data, "train")
    enc, _ = build_pruned_encoder(loaded, EncoderSpec(schedule_for(loaded, "none")), normalize=True)
    zero = text_classifier(loaded, test).float()  # [C, E] unit rows
    xt, yt = embed(enc, test, loaded.preprocess)
    out = {"data": data, "test_images": len(test),
           "zero_shot": 100.0 * float(((xt @ zero.t()).argmax(1) == yt).float().mean())}
    scale = float(loaded.model.logit_scale.detach().exp())
    for k in shots:
        xs, ys = embed(enc, few_shot(train, k, seed), loaded.preprocess)
        w = torch.nn.Parameter(zero.clone())
        opt = torch.optim.Adam([w], lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(scale * xs @ F.normalize(w, dim=-1).t(), ys)
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[f"probe_{k}_shots"] = 100.0 * float(((xt @ F.normalize(w, dim=-1).t()).argmax(1) == yt).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--data", action="append", default=None)
    ap.add_argument("--shots", default="16,64,300")
    args = ap.parse_args()
    torch.manual_seed(0)
    loaded = load_clip(args.model)
    for data in args.data or ["testbed"]:
        print(json.dumps(headroom(loaded, data, [int(s) for s in args.shots.split(",")])), flush=True)


if __name__ == "__main__":
    main()
