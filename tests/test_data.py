"""The embedded demo set and the MONAI pipeline that reads the on-disk convention."""

from __future__ import annotations

import filecmp
import json
import math
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


# ---------------------------------------------------------------------------------------------- regimes


@pytest.fixture(scope="module")
def regimes(tmp_path_factory) -> dict[str, Path]:
    """The rich (default) and scarce demo at 32x32, four sites, seed 0."""
    root = tmp_path_factory.mktemp("regimes")
    assert main(["data", "demo", "--out", str(root / "scarce"), "--size", "32", "--regime", "scarce"]) == 0
    build_demo(root / "rich", size=32, verbose=False)
    return {"rich": root / "rich", "scarce": root / "scarce"}


def _patients(folder: Path, site: str) -> dict[str, dict[str, int]]:
    """split -> {patient: number of labelled slices}."""
    dl = load_datalist(folder / site, site)
    out: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        for e in dl[split]:
            out.setdefault(split, {}).setdefault(e["case_id"], 0)
            out[split][e["case_id"]] += 1
    return out


def test_scarce_regime_trains_on_few_sparsely_labelled_patients_and_tests_like_rich(regimes):
    rich, scarce = load_dataset_info(regimes["rich"]), load_dataset_info(regimes["scarce"])
    assert scarce.sites == rich.sites == ["site-a", "site-b", "site-c", "site-d"]
    assert scarce.labels == rich.labels and scarce.extra["regime"] == "scarce" and "regime" not in rich.extra
    for site, n_train in zip(scarce.sites, (2, 2, 1, 1)):
        r, s = _patients(regimes["rich"], site), _patients(regimes["scarce"], site)
        # one training patient per six of rich's, one labelled slice each
        assert len(s["training"]) == n_train == math.ceil(len(r["training"]) / 6)
        assert set(s["training"].values()) == {1} and set(r["training"].values()) == {6}
        # validation and test: as many patients as rich, every slice labelled
        for split in ("validation", "testing"):
            assert len(s[split]) == len(r[split]) >= 1
            assert set(s[split].values()) == {6}
        # patient-wise splits
        assert not (set(s["training"]) & set(s["validation"]) or set(s["training"]) & set(s["testing"]))
        assert not set(s["validation"]) & set(s["testing"])
    # milder annotation shift: each threshold a quarter as far from 0.5 as rich's
    thresholds = {k: (rich.extra["sites"][k]["threshold"], v["threshold"]) for k, v in scarce.extra["sites"].items()}
    for t_rich, t_scarce in thresholds.values():
        assert t_scarce == pytest.approx(0.5 + (t_rich - 0.5) / 4, abs=1e-3)
    # the T2-like site keeps its histogram shift but not the contrast inversion; the other scanners as rich
    scanners = {k: (rich.extra["sites"][k]["scanner"], v["scanner"]) for k, v in scarce.extra["sites"].items()}
    assert scanners["site-d"] == ("t2like", "histogram")
    assert all(a == b for site, (a, b) in scanners.items() if site != "site-d")


def _between_subject_spread(folder: Path, site: str) -> float:
    """Mean pixel-wise std of the tissue label across subjects at the same slice index (validation + test)."""
    data = load_site(folder, site, 32, splits=("validation", "testing"))
    by_index: dict[int, list[np.ndarray]] = {}
    for split in ("validation", "testing"):
        part = data.splits[split]
        for i, s in enumerate(part.slices):
            by_index.setdefault(s, []).append(part.labels[i, 0].numpy())
    return float(np.mean([np.stack(v).std(axis=0).mean() for v in by_index.values()]))


def test_scarce_subjects_vary_more_in_anatomy_than_rich(regimes):
    # the same site and slice levels; only the per-subject deformation differs (about 0.17 vs 0.27 at seed 0)
    rich = _between_subject_spread(regimes["rich"], "site-a")
    scarce = _between_subject_spread(regimes["scarce"], "site-a")
    assert scarce > 1.3 * rich


def test_unknown_regime_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown regime 'poor'"):
        build_demo(tmp_path / "x", size=16, regime="poor", verbose=False)
