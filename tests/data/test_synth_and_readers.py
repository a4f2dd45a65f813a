"""The synthetic generator, its CLI, and the raw-layout readers (no Ray)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from service.data import readers
from service.data.synthetic import SynthConfig, generate, render_image


def _tree_digest(root: str) -> str:
    h = hashlib.sha256()
    for dirpath, _dirs, files in sorted(os.walk(root)):
        for name in sorted(files):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_generation_is_deterministic_for_a_seed(tmp_path):
    params = dict(classes=3, images_per_class=3, val_per_class=2, size_scale=0.1, bad_inputs=True)
    generate(SynthConfig(out=str(tmp_path / "a"), seed=1, **params))
    generate(SynthConfig(out=str(tmp_path / "b"), seed=1, **params))
    generate(SynthConfig(out=str(tmp_path / "c"), seed=2, **params))
    assert _tree_digest(str(tmp_path / "a")) == _tree_digest(str(tmp_path / "b"))
    assert _tree_digest(str(tmp_path / "a")) != _tree_digest(str(tmp_path / "c"))


def test_images_have_imagenet_like_sizes_and_class_dependent_content():
    sizes = np.array([render_image(0, "train", c, i, 1.0).size for c in range(4) for i in range(10)])
    assert 400 < sizes[:, 0].mean() < 560 and 300 < sizes[:, 1].mean() < 480
    assert len({tuple(s) for s in sizes}) > 10, "sizes vary"
    small = render_image(0, "train", 0, 0, 0.32)
    assert 110 <= max(small.size) <= 210


@pytest.mark.parametrize("layout, expected", [
    ("imagefolder", ["train/n01440764/n01440764_1.JPEG", "val/", "LOC_synset_mapping.txt"]),
    ("kaggle", ["ILSVRC/Data/CLS-LOC/train/n01440764/n01440764_1.JPEG",
                "ILSVRC/Data/CLS-LOC/val/ILSVRC2012_val_00000001.JPEG", "LOC_val_solution.csv"]),
    ("ilsvrc-tars", ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar",
                     "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                     "ILSVRC2012_devkit_t12/data/meta.mat"]),
])
def test_layouts_have_the_real_paths(synth_dataset, layout, expected):
    root, manifest = synth_dataset(layout)
    rels = {os.path.relpath(os.path.join(d, f), root) for d, _s, fs in os.walk(root) for f in fs}
    for path in expected:
        assert any(r.startswith(path) for r in rels), (path, sorted(rels)[:20])
    assert manifest["wnids"][:2] == ["n01440764", "n01443537"] and manifest["names"][0] == "tench"


def _labelled(listing: readers.Listing) -> dict[str, tuple[str, str]]:
    """{file name: (wnid, reason)} after indexing any archives (serially, no Ray)."""
    items = list(listing.items)
    for tar_range in listing.tar_ranges:
        items += readers.items_from_members(listing, tar_range, readers.index_tar_range(tar_range))
    return {item.key.rsplit("/", 1)[-1]: (item.wnid, item.reason) for item in items}


@pytest.mark.parametrize("devkit_meta", ["mat", "txt"])
def test_every_layout_yields_the_same_labels(synth_dataset, devkit_meta):
    results = {}
    for layout in ("imagefolder", "kaggle", "ilsvrc-tars"):
        root, manifest = synth_dataset(layout, bad_inputs=True, devkit_meta=devkit_meta)
        listing = readers.list_layout(root)
        assert listing.layout == layout
        assert listing.wnids == manifest["wnids"] and listing.names == manifest["names"]
        labelled = _labelled(listing)
        assert len(labelled) == manifest["num_inputs"]
        results[layout] = {name: wnid for name, (wnid, reason) in labelled.items()
                           if not reason and name.startswith("ILSVRC2012_val_")}
    # Validation labels come from folders, LOC_val_solution.csv and devkit ids respectively.
    assert results["imagefolder"] == results["kaggle"] == results["ilsvrc-tars"]
    assert len(results["imagefolder"]) >= 4 * 3


def test_unknown_wnids_and_missing_ground_truth_are_flagged_at_listing(synth_dataset):
    root, _manifest = synth_dataset("ilsvrc-tars", bad_inputs=True)
    labelled = _labelled(readers.list_layout(root))
    reasons = [reason for _wnid, reason in labelled.values() if reason]
    assert reasons.count("unknown_wnid") == 3 and reasons.count("no_ground_truth") == 1


def test_detect_layout_error_names_the_options():
    with pytest.raises(ValueError, match="cannot detect the layout of /raw: expected ILSVRC/Data/CLS-LOC/"):
        readers.detect_layout({"README.md"}, "/raw")


def test_synth_cli(tmp_path):
    cmd = [sys.executable, "-m", "service.synth", f"out={tmp_path}/d", "classes=2", "images_per_class=2",
           "val_per_class=1", "layout=kaggle", "seed=3", "size_scale=0.1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert os.path.isfile(tmp_path / "d" / "LOC_val_solution.csv")
    img = Image.open(tmp_path / "d" / "ILSVRC" / "Data" / "CLS-LOC" / "train" / "n01440764" / "n01440764_1.JPEG")
    assert img.format == "JPEG"
    bad = subprocess.run(cmd[:4] + ["layout=zip"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "layout='zip' is not allowed" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
