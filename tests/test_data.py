"""The embedded demo set and the MONAI pipeline that reads the on-disk convention."""

from __future__ import annotations

import filecmp
import json
from pathlib import Path

import numpy as np
import pytest

from lcfed.ops.cli import main
from lcfed.ops.data.demo import build_demo
from lcfed.runtime.data.layout import SPLITS, load_datalist, load_dataset_info, split_by_patient
from lcfed.runtime.data.pipeline import load_site


def _same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    if any(not filecmp.cmp(a / n, b / n, shallow=False) for n in cmp.common_files):
        return False
    return all(_same_tree(a / d, b / d) for d in cmp.common_dirs)


def test_demo_is_deterministic_per_seed(tmp_path, tiny_data):
    again = tmp_path / "again"
    build_demo(again, n_sites=3, size=32, seed=0, verbose=False)
    assert _same_tree(Path(tiny_data), again)
    other = tmp_path / "other"
    build_demo(other, n_sites=3, size=32, seed=1, verbose=False)
    assert not _same_tree(Path(tiny_data), other)


def test_demo_layout_sites_splits_and_licence(tiny_data):
    info = load_dataset_info(tiny_data)
    assert info.sites == ["site-a", "site-b", "site-c"]
    assert info.channels == 1 and info.labels == {"tissue": [1, 2], "wm": [2]}
    notice = (Path(tiny_data) / "LICENSE-ICBM152.txt").read_text()
    assert "Louis Collins" in notice and "Fonov" in notice
    sizes = []
    for site in info.sites:
        dl = load_datalist(Path(tiny_data) / site, site)
        cases = {split: {e["case_id"] for e in dl[split]} for split in SPLITS}
        # patient-wise splits: no patient in two splits, every split non-empty
        assert all(cases[s] for s in SPLITS)
        assert not (cases["training"] & cases["validation"] or cases["training"] & cases["testing"])
        assert not cases["validation"] & cases["testing"]
        sizes.append(sum(len(dl[s]) for s in SPLITS))
    assert sizes[0] > sizes[1] > sizes[2]  # size shift between sites


def test_demo_sites_differ_in_annotation_style_and_appearance(tiny_data):
    stats = {}
    for site in load_dataset_info(tiny_data).sites:
        data = load_site(tiny_data, site, 32, splits=("training",))
        train = data.splits["training"]
        stats[site] = (float(train.labels[:, 1].mean() / train.labels[:, 0].mean()), train.images)
    # the white-matter share of the tissue follows each site's threshold (0.50 / 0.35 / 0.65)
    ratios = {s: v[0] for s, v in stats.items()}
    assert ratios["site-b"] > ratios["site-a"] > ratios["site-c"]


def test_pipeline_shapes_binary_channels_and_normalisation(tiny_data):
    data = load_site(tiny_data, "site-a", 24)
    train = data.splits["training"]
    assert train.images.shape[1:] == (1, 24, 24)
    assert train.labels.shape[1:] == (2, 24, 24)
    assert set(np.unique(train.labels.numpy())) <= {0.0, 1.0}
    # the wm channel lies inside the tissue channel (overlapping labels, like fundus cup in disc)
    assert bool((train.labels[:, 1] <= train.labels[:, 0]).all())
    per_image_mean = train.images.mean(dim=(1, 2, 3))
    assert np.allclose(per_image_mean.numpy(), 0.0, atol=0.05)  # per-image z-score before resizing
    assert len(train.case_ids) == len(train) and len(set(train.case_ids)) < len(train)  # slices regroup


def test_split_by_patient_is_deterministic_and_complete():
    ids = [f"p{i}" for i in range(10)]
    a = split_by_patient(ids, seed=3)
    assert a == split_by_patient(list(reversed(ids)), seed=3)
    assert sorted(sum(a.values(), [])) == sorted(ids)
    assert [len(a[s]) for s in SPLITS] == [6, 2, 2]
    assert all(split_by_patient(["x", "y", "z"])[s] for s in SPLITS)


def test_demo_command_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["data", "demo", "--out", str(out), "--sites", "2", "--size", "32"]) == 0
    assert json.loads((out / "dataset.json").read_text())["sites"] == ["site-a", "site-b"]
    # an existing data set is never overwritten silently
    assert main(["data", "demo", "--out", str(out), "--sites", "2", "--size", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("n_sites", [5])
def test_more_sites_than_the_four_defaults(tmp_path, n_sites):
    info = build_demo(tmp_path / "five", n_sites=n_sites, size=16, verbose=False)
    assert len(info.sites) == n_sites and len(set(info.sites)) == n_sites
