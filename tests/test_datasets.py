import json

import numpy as np
import pytest
from PIL import Image

from prtool.data.datasets import few_shot, load_dataset
from prtool.errors import PrtoolError

PRE = {"image_size": [64, 64], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic"}


def make_images(root, classes=("cat", "dog"), per_class=3, size=(48, 40)):
    paths = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            p = root / name / f"{i}.png"
            arr = (np.random.default_rng(c * 100 + i).random((size[1], size[0], 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(p)
            paths.append((p, c, name))
    return paths


def test_image_folder(tmp_path):
    make_images(tmp_path / "data")
    ds = load_dataset(str(tmp_path / "data"), "test")
    assert ds.classnames == ["cat", "dog"] and len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.class_prompts[1][0] == "a photo of a dog."
    pixels, labels, rows = ds.load(range(6), PRE)
    assert pixels.shape == (6, 3, 64, 64) and rows == list(range(6))


def test_csv_and_coop_json(tmp_path):
    paths = make_images(tmp_path / "imgs")
    csv = tmp_path / "m.csv"
    csv.write_text("path,label,classname\n" + "".join(f"imgs/{p.parent.name}/{p.name},{c},{n}\n" for p, c, n in paths))
    ds = load_dataset(str(csv), "test")
    assert ds.classnames == ["cat", "dog"] and len(ds) == 6
    split = {"train": [[f"{p.parent.name}/{p.name}", c, n] for p, c, n in paths[:4]],
             "val": [], "test": [[f"{p.parent.name}/{p.name}", c, n] for p, c, n in paths[4:]]}
    js = tmp_path / "split_zhou_Toy.json"
    js.write_text(json.dumps(split))
    tr = load_dataset(str(js), "train", image_root=tmp_path / "imgs")
    te = load_dataset(str(js), "test", image_root=tmp_path / "imgs")
    assert len(tr) == 4 and len(te) == 2 and te.classnames == ["cat", "dog"]
    with pytest.raises(PrtoolError, match="does not exist"):
        load_dataset(str(js), "train")  # wrong image root


def test_testbed_dataset_and_few_shot():
    ds = load_dataset("testbed", "train")
    assert len(ds) == 3000 and ds.classnames[7] == "sneaker"
    fs = few_shot(ds, 16, seed=3)
    assert len(fs) == 160 and np.bincount(fs.labels).tolist() == [16] * 10
    assert [fs.sample_id(i) for i in range(160)] == [few_shot(ds, 16, seed=3).sample_id(i) for i in range(160)]
    assert few_shot(ds, 16, seed=4).samples != fs.samples
    val = load_dataset("testbed", "val")  # held out for calibration (prtool plan): other items than test's
    assert len(val) == 3000 and val.fingerprint() != load_dataset("testbed", "test").fingerprint()
    from prtool.testbed.eval_set import load_split_canvases

    with pytest.raises(PrtoolError, match="ships the splits"):
        load_split_canvases("dev")


def test_corrupt_image_is_named_or_skipped(tmp_path):
    make_images(tmp_path / "d")
    bad = tmp_path / "d" / "dog" / "zz.jpg"
    bad.write_bytes(b"not a jpeg at all")
    ds = load_dataset(str(tmp_path / "d"), "test")
    with pytest.raises(PrtoolError, match="zz.jpg"):
        list(ds.batches(4, PRE))
    got = [b for b in ds.batches(4, PRE, skip_bad=True)]
    assert sum(len(b[1]) for b in got) == 6 and ds.skipped == [str(bad)]


def test_unlabelled_folder(tmp_path):
    for i in range(3):
        Image.new("RGB", (30, 30), (i * 50, 0, 0)).save(tmp_path / f"{i}.png")
    ds = load_dataset(str(tmp_path), "test")
    assert ds.classnames == [] and (ds.labels == -1).all()


def test_templates_file(tmp_path):
    make_images(tmp_path / "d")
    t = tmp_path / "t.json"
    t.write_text(json.dumps({"d": ["itap of a {}."], "default": ["x {}"]}))
    from prtool.data.datasets import prompts_for

    assert prompts_for(["cat"], t, "d") == [["itap of a cat."]]
    t.write_text(json.dumps(["no placeholder"]))
    with pytest.raises(PrtoolError, match="containing"):
        prompts_for(["cat"], t)
