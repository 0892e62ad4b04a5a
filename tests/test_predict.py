"""Prediction at a hospital with its personalized model, the exported model, and distances in true millimetres."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lcfed.ops.cli import main
from lcfed.ops.predict import find_scans, label_map, load_exported, load_site_model, predict_scans
from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import make_config
from lcfed.runtime.contract import bank_key
from lcfed.runtime.data.layout import DatasetInfo, load_datalist, save_image, write_datalist, write_dataset_info
from lcfed.runtime.data.pipeline import load_site
from lcfed.runtime.metrics import evaluate_site
from lcfed.runtime.trainer import SiteTrainer

SITES = ["site-a", "site-b", "site-c"]
# an anisotropic, sheared, off-origin affine: 0.7 x 0.9 x 3.0 mm voxels
AFFINE = np.array([[0.7, 0.05, 0.0, 10.0], [0.0, 0.9, 0.1, -20.0], [0.02, 0.0, 3.0, 5.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def model_file(tiny_data, tmp_path_factory) -> Path:
    """site-a's LC-Fed checkpoint after one network round and one staged HC round, with a three-site head bank."""
    cfg = make_config("tiny", rounds=1, hc_rounds=1)  # one network round (0), then one staged HC round (1)
    trainer = SiteTrainer(get_algorithm("lcfed"), cfg, load_site(tiny_data, "site-a", cfg.size), SITES, "site-a")
    trainer.train_round(0)
    # the other sites' heads: site-a's own, perturbed (what the server's bank would send), so U and its peaks are live
    gen = torch.Generator().manual_seed(0)
    bank = {}
    for k, site in enumerate(SITES):
        for key, value in trainer.model.state_dict().items():
            if key.startswith("head."):
                noise = 0 if site == "site-a" else 0.5 * k * torch.randn(value.shape, generator=gen)
                bank[bank_key(site, key)] = (value + noise).numpy()
    trainer.receive(bank, 1)
    trainer.train_round(1)
    assert bool(trainer.model.hc.trained) and len(trainer.ctx.head_bank) == 3
    path = tmp_path_factory.mktemp("models") / "site-a" / "lcfed" / "best.pt"
    trainer.save(path, round=1, val_dice=0.5)
    return path


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _channels_first(prob: np.ndarray, n_classes: int) -> np.ndarray:
    """A written probability map (spatial..., C), 2-D ones as (H, W, 1, C), back to (C, spatial...)."""
    return np.moveaxis(prob.reshape(*prob.shape[:2], -1, n_classes).squeeze(2), -1, 0)


def test_predicting_the_test_split_reproduces_evaluate(model_file, tiny_data, tmp_path, capsys):
    model = load_site_model(model_file, device="cpu")
    model.trainer.data = load_site(tiny_data, "site-a", model.size, splits=("testing",))
    expected = model.trainer.evaluate("testing")

    out = tmp_path / "out"
    datalist = Path(tiny_data) / "site-a" / "datalist.json"
    code, stdout, _ = _cli(
        capsys, "predict", "--model", model_file, "--input", datalist, "--out", out, "--probabilities"
    )
    assert code == 0
    cases = {e["case_id"] for e in load_datalist(datalist.parent, "site-a")["testing"]}
    assert f"scan 1 of {len(cases)}" in stdout and "ETA" in stdout

    info = model.trainer.data.info
    ids, slices, probs, labels, decoded = [], [], [], [], []
    for entry in load_datalist(datalist.parent, "site-a")["testing"]:
        stem = Path(entry["image"]).name[: -len(".nii.gz")]
        prob = _channels_first(np.asarray(nib.load(out / f"{stem}_prob.nii.gz").dataobj), info.n_classes)
        seg = np.asarray(nib.load(out / f"{stem}_seg.nii.gz").dataobj)
        assert seg.dtype == np.uint8 and np.array_equal(seg, label_map(prob >= 0.5))
        truth = np.asarray(nib.load(entry["label"]).dataobj)
        ids.append(entry["case_id"])
        slices.append(entry["slice"])
        probs.append(prob)
        labels.append(np.stack([np.isin(truth, codes) for codes in info.labels.values()]))
        decoded.append(np.stack([np.isin(seg, codes) for codes in info.labels.values()]))
    got = evaluate_site(ids, slices, probs, labels, largest_cc=info.largest_component)
    assert got["dice"] == pytest.approx(expected["dice"], abs=1e-3)
    for case, metrics in expected["cases"].items():
        assert got["cases"][case]["dice"] == pytest.approx(metrics["dice"], abs=1e-3)
    # the label map alone, decoded with the data set's codes (tissue = {1, 2}, wm = {2}), says the same here
    from_map = evaluate_site(ids, slices, decoded, labels, largest_cc=False)
    assert from_map["dice"] == pytest.approx(expected["dice"], abs=1e-3)
    manifest = json.loads((out / "predictions.json").read_text())
    assert manifest["label_map"] == {"0": "background", "1": "tissue", "2": "wm"} and not manifest["failed"]


def test_anisotropic_volume_comes_back_in_its_own_geometry(model_file, tmp_path, capsys):
    volume = (np.random.default_rng(0).random((37, 45, 7)) * 400).astype(np.int16)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(volume, AFFINE), scan)
    out = tmp_path / "out"
    code, stdout, _ = _cli(
        capsys, "predict", "--model", model_file, "--input", scan, "--out", out, "--probabilities", "--disagreement"
    )
    assert code == 0 and "scan 1 of 1: scan: 7 slice(s)" in stdout
    original = nib.load(scan)
    for kind, shape in (("seg", (37, 45, 7)), ("prob", (37, 45, 7, 2)), ("disagreement", (37, 45, 7, 2))):
        written = nib.load(out / f"scan_{kind}.nii.gz")
        assert written.shape == shape
        assert np.array_equal(written.affine, original.affine)
    seg = np.asarray(nib.load(out / "scan_seg.nii.gz").dataobj)
    prob = np.moveaxis(np.asarray(nib.load(out / "scan_prob.nii.gz").dataobj), -1, 0)
    assert np.array_equal(seg, label_map(prob >= 0.5))
    u = np.asarray(nib.load(out / "scan_disagreement.nii.gz").dataobj)
    assert 0.0 <= u.min() and u.max() <= 1.0 + 1e-6 and u.max() > 0  # the bank disagrees somewhere


def test_exported_model_matches_the_checkpoint_without_the_bundle(model_file, tmp_path, capsys):
    exported = tmp_path / "model.ts"
    code, stdout, _ = _cli(capsys, "export", "--model", model_file, "--out", exported)
    assert code == 0 and "input ['N', 1, 32, 32], output ['N', 2, 32, 32]" in stdout
    _, contract = load_exported(exported)
    assert contract["output"]["classes"] == ["tissue", "wm"] and contract["site"] == "site-a"

    images = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(images, tmp_path / "images.pt")
    # plain torch: this bundle and MONAI cannot even be imported
    script = (
        "import sys; sys.modules['lcfed'] = None; sys.modules['monai'] = None\n"
        "import torch\n"
        f"module = torch.jit.load({str(exported)!r})\n"
        f"with torch.no_grad(): out = module(torch.load({str(tmp_path / 'images.pt')!r}))\n"
        f"torch.save(out, {str(tmp_path / 'out.pt')!r})\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    got = torch.load(tmp_path / "out.pt")
    expected = load_site_model(model_file, device="cpu").trainer.predict_images(images)
    assert got.shape == (5, 2, 32, 32)
    assert torch.allclose(got, expected, atol=1e-4)

    # docs/predict.md's plain-torch recipe on a raw volume gives predict's label map
    doc = (Path(__file__).parents[1] / "docs" / "predict.md").read_text()
    recipe = doc[doc.index("<!-- recipe") :].split("```python\n", 1)[1].split("```", 1)[0]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image((np.random.default_rng(2).random((37, 45, 7)) * 400).astype(np.int16), AFFINE), scan)
    script = (
        "import sys; sys.modules['lcfed'] = None; sys.modules['monai'] = None\n"
        f"import nibabel, numpy\nMODEL = {str(exported)!r}\nvolume = nibabel.load({str(scan)!r}).get_fdata()\n"
        f"{recipe}\nnumpy.save({str(tmp_path / 'labels.npy')!r}, labels)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    assert _cli(capsys, "predict", "--model", model_file, "--input", scan, "--out", tmp_path / "masks")[0] == 0
    expected_labels = np.asarray(nib.load(tmp_path / "masks" / "scan_seg.nii.gz").dataobj)
    assert np.array_equal(np.load(tmp_path / "labels.npy"), expected_labels)


def _write_nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, AFFINE), path)


def test_bad_scans_fail_alone_with_one_line_each(model_file, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    rng = np.random.default_rng(1)
    _write_nifti(scans / "good.nii.gz", rng.random((40, 30, 3)).astype(np.float32))
    (scans / "empty.nii.gz").write_bytes(b"")
    (scans / "truncated.nii.gz").write_bytes((scans / "good.nii.gz").read_bytes()[:100])
    (scans / "junk.png").write_bytes(b"this is not an image")
    Image.fromarray((rng.random((20, 30, 3)) * 255).astype(np.uint8)).save(scans / "colour.png")  # 3 channels
    _write_nifti(scans / "twochannel.nii.gz", rng.random((20, 20, 4, 2)).astype(np.float32))
    (scans / "readme.txt").write_text("not a scan, skipped")
    out = tmp_path / "out"
    code, stdout, stderr = _cli(capsys, "predict", "--model", model_file, "--input", scans, "--out", out)
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    expected = {
        "empty.nii.gz": "empty file",
        "truncated.nii.gz": "cannot read as NIfTI",
        "junk.png": "cannot read as a PNG/JPEG image",
        "colour.png": "image has 3 channel(s), the model takes 1",
        "twochannel.nii.gz": "image has 2 channels",
    }
    assert len(errors) == len(expected)
    for name, message in expected.items():
        assert any(str(scans / name) in line and message in line for line in errors), (name, errors)
    assert "5 failed" in stdout and "scan 6 of 6" in stdout
    written = nib.load(out / "good_seg.nii.gz")
    assert written.shape == (40, 30, 3) and np.array_equal(written.affine, nib.load(scans / "good.nii.gz").affine)
    assert sorted(json.loads((out / "predictions.json").read_text())["failed"]) == sorted(
        ["empty", "truncated", "junk", "colour", "twochannel"]
    )


def test_nothing_to_read_and_foreign_checkpoints_are_refused(model_file, tiny_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    code, _, stderr = _cli(capsys, "predict", "--model", model_file, "--input", empty, "--out", tmp_path / "o1")
    assert code == 2 and str(empty) in stderr and "nothing to read" in stderr

    # a checkpoint whose weights are not those of the model its configuration describes
    state = torch.load(model_file, weights_only=True)
    state["config"]["width"] = state["identity"]["config"]["width"] = 8
    other = tmp_path / "other.pt"
    torch.save(state, other)
    code, _, stderr = _cli(capsys, "predict", "--model", other, "--input", empty, "--out", tmp_path / "o2")
    assert code == 2 and str(other) in stderr and "another configuration" in stderr
    # one sentence, then the hint every command gives (no traceback)
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and "--verbose" in lines[1]

    not_a_checkpoint = tmp_path / "best.pt"
    not_a_checkpoint.write_text("hello")
    code, _, stderr = _cli(capsys, "export", "--model", not_a_checkpoint, "--out", tmp_path / "m.ts")
    assert code == 2 and str(not_a_checkpoint) in stderr

    # a datalist of a data set with other classes than the model's
    data = tmp_path / "data"
    info = json.loads((Path(tiny_data) / "dataset.json").read_text())
    info["labels"] = {"tumour": [1]}
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps(info))
    (data / "site-a").mkdir()
    (data / "site-a" / "datalist.json").write_text((Path(tiny_data) / "site-a" / "datalist.json").read_text())
    code, _, stderr = _cli(
        capsys, "predict", "--model", model_file, "--input", data / "site-a" / "datalist.json", "--out", tmp_path / "o3"
    )
    assert code == 2 and str(model_file) in stderr and "another configuration" in stderr and "tumour" in stderr


def test_hd95_in_millimetres_when_stored_and_working_sizes_differ(tmp_path):
    """Cases stored at 64 and 96 pixels, evaluated at the tiny preset's 32: distances stay in stored millimetres."""
    work = 32
    spacing = (0.5, 0.8, 2.0)
    line_h = np.zeros((work, work), np.uint8)  # a horizontal segment; moved 3 rows down below
    line_h[12, 8:24] = 1
    line_v = line_h.T.copy()  # a vertical segment; moved 3 columns right below
    data, site = tmp_path / "data", tmp_path / "data" / "s"
    entries = {"training": [], "testing": []}
    for split, case, label, factor in (
        ("training", "t", line_h, 2),
        ("testing", "a", line_h, 2),
        ("testing", "b", line_v, 3),
    ):
        # stored at factor x the working size; nearest resizing to 32 (src = factor * dst) gives `label` back
        stored = np.kron(label, np.ones((factor, factor), np.uint8))
        image = np.random.default_rng(factor).random(stored.shape).astype(np.float32)
        save_image(site / "images" / f"{case}.nii.gz", image, spacing[:2])
        save_image(site / "labels" / f"{case}.nii.gz", stored, spacing[:2])
        entries[split].append({"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "case_id": case})
    write_datalist(site, "s", entries, spacing=spacing)
    write_dataset_info(data, DatasetInfo(name="sizes", sites=["s"], channels=1, labels={"line": [1]}))

    cfg = make_config("tiny")
    trainer = SiteTrainer(get_algorithm("fedavg"), cfg, load_site(data, "s", cfg.size), ["s"], "s")
    test = trainer.data.splits["testing"]
    assert np.array_equal(test.labels[0, 0].numpy(), line_h) and np.array_equal(test.labels[1, 0].numpy(), line_v)
    shifted = torch.stack([torch.roll(test.labels[0], 3, dims=1), torch.roll(test.labels[1], 3, dims=2)])
    trainer.predict = lambda split="validation": shifted  # a prediction 3 working pixels off

    m = trainer.evaluate("testing")
    # every point of one segment is 3 working pixels from the other: 3 px x stored spacing x stored/working size
    assert m["cases"]["a"]["hd95"] == pytest.approx(3 * 0.5 * 64 / 32)  # 3.0 mm along the rows
    assert m["cases"]["b"]["hd95"] == pytest.approx(3 * 0.8 * 96 / 32)  # 7.2 mm along the columns
    assert m["cases"]["a"]["assd"] == pytest.approx(3.0) and m["cases"]["b"]["assd"] == pytest.approx(7.2)
    assert np.allclose(test.spacing, [(1.0, 1.6, 2.0), (1.5, 2.4, 2.0)])


def test_raw_volumes_of_an_imported_data_set_get_the_importer_scaling(model_file, tmp_path):
    """A prostate model saw slices the importer had clipped and scaled; a raw volume gets the same first."""
    from lcfed.ops.data.importers import normalize_slice

    raw = np.random.default_rng(4).gamma(2.0, 100.0, (30, 26, 4)).astype(np.float32)
    raw[3, 4, :] = 1e5  # a hot voxel in every slice, which the importer clips at the 99th percentile
    scaled = np.stack([normalize_slice(raw[:, :, z]) for z in range(raw.shape[2])], axis=-1)
    for folder, volume in (("raw", raw), ("scaled", scaled)):
        (tmp_path / folder).mkdir()
        nib.save(nib.Nifti1Image(volume, AFFINE), tmp_path / folder / "scan.nii.gz")

    model = load_site_model(model_file, device="cpu")

    def probabilities(folder: str, kind: str | None) -> np.ndarray:
        model.kind = kind
        out = tmp_path / f"out-{folder}-{kind}"
        assert predict_scans(model, find_scans(tmp_path / folder), out, probabilities=True, log=None).ok
        return np.asarray(nib.load(out / "scan_prob.nii.gz").dataobj)

    imported = probabilities("raw", "prostate")
    assert np.allclose(imported, probabilities("scaled", None), atol=1e-5)
    assert not np.allclose(imported, probabilities("raw", None), atol=1e-3)  # the step matters
