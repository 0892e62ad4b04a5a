"""Bad input a hospital may bring: every case fails with a message naming the site, the file and the problem.

Each case goes through the path a real run takes (the site's learner initialising from its site-local
configuration, the job export, the server components); ``test_e2e_simulator`` shows that an error at
a site fails the whole FLARE run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import FakeFLContext, start_learner

from lcfed.ops.jobs import JobSpec, export_job
from lcfed.runtime.config import make_config
from lcfed.runtime.data.layout import DataError
from lcfed.runtime.fl.aggregator import HeadBankAggregator
from lcfed.runtime.fl.learner import LCFedLearner
from lcfed.runtime.trainer import CheckpointMismatch

SITES = ["site-a", "site-b", "site-c"]


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny 3-site demo set that a test may break."""
    out = tmp_path / "data"
    shutil.copytree(tiny_data, out)
    return out


def start_site(data_root: Path | str, workspace: Path, site: str = "site-a", **learner_args) -> LCFedLearner:
    """Initialise a site's learner the way FLARE does, with the site's local data configuration."""
    (workspace / "local").mkdir(parents=True, exist_ok=True)
    (workspace / "local" / "lcfed_site.json").write_text(json.dumps({"data_root": str(data_root)}))
    args = dict(algorithm="lcfed", sites=SITES, preset="tiny", in_channels=1, n_classes=2, tensorboard=False)
    args.update(learner_args)
    return start_learner(LCFedLearner(**args), FakeFLContext(workspace, site))


def first_entry(data: Path, site: str = "site-a", split: str = "training") -> dict:
    return json.loads((data / site / "datalist.json").read_text())[split][0]


def expect(exc: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(exc.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"


# -- the site's data ---------------------------------------------------------------------------------
def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError) as exc:
        start_site(tmp_path / "nowhere", tmp_path / "ws")
    expect(exc, "site-a", str(tmp_path / "nowhere"), "not found")


def test_missing_site_folder(data, tmp_path):
    shutil.rmtree(data / "site-a")
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", str(data / "site-a"), "site data folder not found")


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{ not json", "malformed JSON"),
        ('{"training": [], "validation": []}', "no training entries"),
        ("[]", "JSON object"),
    ],
)
def test_empty_or_malformed_datalist(data, tmp_path, content, problem):
    (data / "site-a" / "datalist.json").write_text(content)
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", "datalist.json", problem)


def test_datalist_entry_without_its_file(data, tmp_path):
    entry = first_entry(data)
    (data / "site-a" / entry["label"]).unlink()
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["label"], "file not found")


def test_image_that_is_not_a_nifti(data, tmp_path):
    entry = first_entry(data)
    (data / "site-a" / entry["image"]).write_bytes(b"this is not a NIfTI file")
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["image"], "cannot read image as NIfTI")


def test_image_and_label_shapes_differ(data, tmp_path):
    entry = first_entry(data)
    nib.save(nib.Nifti1Image(np.zeros((20, 32), np.float32), np.eye(4)), str(data / "site-a" / entry["image"]))
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["image"], "(20, 32) differs from label shape (32, 32)")


def test_label_values_outside_the_expected_set(data, tmp_path):
    entry = first_entry(data)
    label = np.zeros((32, 32), np.uint8)
    label[3, 3] = 7
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(data / "site-a" / entry["label"]))
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["label"], "label values [7] outside the expected set [0, 1, 2]")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_voxels(data, tmp_path, bad):
    entry = first_entry(data, split="validation")
    image = np.asarray(nib.load(str(data / "site-a" / entry["image"])).dataobj).astype(np.float32)
    image[5, 5] = bad
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(data / "site-a" / entry["image"]))
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["image"], "NaN or Inf")


def test_wrong_channel_count(data, tmp_path):
    entry = first_entry(data)
    nib.save(nib.Nifti1Image(np.zeros((32, 32, 3), np.float32), np.eye(4)), str(data / "site-a" / entry["image"]))
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", entry["image"], "3 channel(s), the data set declares 1")


def test_dataset_description_with_missing_fields(data, tmp_path):
    (data / "dataset.json").write_text(json.dumps({"name": "x", "sites": SITES}))
    with pytest.raises(DataError) as exc:
        start_site(data, tmp_path / "ws")
    expect(exc, "site-a", "dataset.json", "missing field(s) ['channels', 'labels']")


# -- the job against the site and the federation ----------------------------------------------------
def test_site_name_not_in_the_jobs_site_list(data, tmp_path):
    with pytest.raises(ValueError) as exc:
        start_site(data, tmp_path / "ws", site="site-x")
    expect(exc, "'site-x' is not in the job's site list", "site-a")


def test_the_same_site_twice(data, tmp_path):
    with pytest.raises(ValueError) as exc:
        export_job(JobSpec(sites=["site-a", "site-b", "site-a"]), tmp_path / "jobs")
    expect(exc, "each site once", "site-a")
    with pytest.raises(ValueError) as exc:
        HeadBankAggregator(sites=["site-a", "site-a"], preset="tiny", n_classes=2)
    expect(exc, "['site-a'] more than once")
    with pytest.raises(ValueError) as exc:
        start_site(data, tmp_path / "ws", sites=["site-a", "site-b", "site-a"])
    expect(exc, "['site-a'] more than once")


@pytest.mark.parametrize(
    "change,problem",
    [({"algorithm": "lcfed-typo"}, "unknown algorithm 'lcfed-typo'"), ({"preset": "huge"}, "unknown preset 'huge'")],
)
def test_unknown_algorithm_or_preset(data, tmp_path, change, problem):
    with pytest.raises(ValueError) as exc:
        export_job(JobSpec(**change), tmp_path / "jobs")
    expect(exc, problem)
    # a hand-edited job config fails the same way where FLARE builds the components
    with pytest.raises(ValueError) as exc:
        start_site(data, tmp_path / "ws", **change)
    expect(exc, problem)
    with pytest.raises(ValueError) as exc:
        HeadBankAggregator(**{"sites": SITES, "n_classes": 2, **change})
    expect(exc, problem)


def test_model_does_not_match_the_sites_data(data, tmp_path):
    with pytest.raises(ValueError) as exc:
        start_site(data, tmp_path / "ws", n_classes=1, in_channels=3)
    expect(exc, "site-a", "takes 3 channel(s) and predicts 1 class(es)", "dataset.json", "1 channel(s)")


def test_global_model_for_another_number_of_sites(data, tmp_path):
    learner = start_site(data, tmp_path / "ws")
    glob = {
        k: v.numpy() for k, v in learner.trainer.model.state_dict().items() if learner.trainer.contract.is_shared(k)
    }
    glob["pcs.embed.0.weight"] = np.zeros((64, 5, 1, 1), np.float32)  # PCS of a 5-site federation
    with pytest.raises(ValueError) as exc:
        learner.trainer.receive(glob)
    expect(exc, "site-a", "pcs.embed.0.weight", "(64, 5, 1, 1)", "(64, 3, 1, 1)", "number of sites")


def test_resumed_checkpoint_from_another_configuration(data, tmp_path):
    ws = tmp_path / "ws"
    learner = start_site(data, ws)
    learner.trainer.save(ws / "lcfed_models" / "lcfed" / "last.pt", job_id="job0")
    saved = (ws / "lcfed_models" / "lcfed" / "last.pt").read_bytes()
    with pytest.raises(CheckpointMismatch) as exc:
        start_site(data, ws, resume=True, options={"width": 6})
    expect(exc, "site-a", "last.pt", "another configuration", "width")
    # nothing saved before is lost
    assert (ws / "lcfed_models" / "lcfed" / "last.pt").read_bytes() == saved


def test_an_options_typo_is_named():
    with pytest.raises(ValueError) as exc:
        make_config("tiny", iteratons=3)
    expect(exc, "unknown training option(s) ['iteratons']")


# -- the command line: one sentence and what to do, never a traceback ------------------------------
def test_cli_failure_is_one_line_with_what_to_do(tmp_path, capsys):
    from lcfed.ops.cli import main

    rc = main(["run", "--data", str(tmp_path / "nowhere"), "--workspace", str(tmp_path / "ws")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    assert err.splitlines()[0] == f"error: [file {tmp_path / 'nowhere'}] data folder not found"
    assert "--verbose" in err.splitlines()[1]
    rc = main(["job", "pack", str(tmp_path), "--out", str(tmp_path / "out"), "--verbose"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and "is not a job folder (no meta.json)" in err.splitlines()[-1]


def test_a_flare_command_that_times_out_is_explained():
    import subprocess

    from lcfed.ops.cli import describe_failure

    text = describe_failure(subprocess.TimeoutExpired(["nvflare", "poc", "start"], 180))
    assert text.startswith("`nvflare poc start` did not finish within 180 s")
    assert "--start-timeout" in text
