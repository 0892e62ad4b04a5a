"""End to end in FLARE's simulator: 2 sites, 2 rounds, tiny preset (the same path as the quick start)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lcfed.ops.run import RunFailed, run_and_report
from lcfed.runtime.fl.aggregator import ROUNDS_FILE

pytestmark = pytest.mark.e2e


def quiet(_: str) -> None:
    pass


def test_simulator_run_trains_for_real_and_writes_results(tiny_data2, tmp_path):
    ws = tmp_path / "run"
    # 2 network rounds (0-1), then staged HC adds hc_rounds (tiny: 1) in which only HC trains (round 2)
    lines: list[str] = []
    results = run_and_report("lcfed", tiny_data2, ws, preset="tiny", options={"rounds": 2}, show=lines.append)
    sites = ["site-a", "site-b"]
    # progress: each aggregated round as round r of R with the mean validation Dice, elapsed and what is left
    progress = [line for line in lines if line.startswith("[lcfed] round ")]
    assert [line.split(",")[0] for line in progress] == ["[lcfed] round 1/3", "[lcfed] round 2/3", "[lcfed] round 3/3"]
    assert all("mean val Dice" in line and "elapsed" in line and "left" in line for line in progress)
    # every round aggregated both sites; the global shared model moved in every network round
    record = json.loads((ws / "simulator/server/simulate_job/app_server" / ROUNDS_FILE).read_text())
    assert [r["round"] for r in record["rounds"]] == [0, 1, 2]
    for r in record["rounds"]:
        assert sorted(r["sites"]) == sites
        assert r["n_shared_keys"] > 0 and r["n_bank_keys"] == 2 * len(sites)
    assert [r["shared_change"] > 0 for r in record["rounds"]] == [True, True, False]  # frozen in the HC round
    # in the HC round each site sent its head only, not the frozen body
    assert [r["sites"]["site-a"]["n_keys"] for r in record["rounds"]][2] == 2
    # the server keeps the shared model and the head bank, never HC
    glob = torch.load(ws / "simulator/server/simulate_job/app_server/FL_global_model.pt", weights_only=True)
    assert {k.split("/")[1] for k in glob["params"] if k.startswith("head_bank/")} == set(sites)
    assert not any(k.startswith(("hc.", "head.")) for k in glob["params"])
    # personalized checkpoints and the site's own TensorBoard events at each site; on the server, events of the
    # validation Dice each site reported (no analytics stream leaves a site beside the audited results)
    for s in sites:
        app = ws / f"models/{s}/lcfed"
        assert (app / "best.pt").is_file() and (app / "last.pt").is_file()
        assert len(json.loads((app / "history.json").read_text())) == 3
        assert any((ws / f"simulator/server/simulate_job/tb_events/{s}").iterdir())
        assert any((app / "tensorboard").iterdir())
        assert not (ws / f"simulator/{s}/simulate_job/tb_events").exists()
    # results
    out = ws / "results"
    for name in ("metrics.json", "summary.md", "curves.png", "overlays.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["algo"] == "lcfed" and sorted(metrics["sites"]) == sites
    for m in list(metrics["sites"].values()) + [metrics["mean"]]:
        assert 0.0 <= m["dice"] <= 1.0 and m["hd95"] >= 0
    assert results["mean"]["dice"] == metrics["mean"]["dice"]
    assert "mean over sites" in (out / "summary.md").read_text()
    # two classes (tissue, wm): each class's metrics beside the mean over classes, named from dataset.json
    assert metrics["class_names"] == ["tissue", "wm"]
    for m in list(metrics["sites"].values()) + [metrics["mean"]]:
        assert sorted(m["per_class"]) == ["assd", "dice", "hd95", "iou"]
        assert m["dice"] == pytest.approx(sum(m["per_class"]["dice"]) / 2)
    assert "| **mean over sites** | wm |" in (out / "summary.md").read_text()


def test_a_broken_site_fails_the_run_loudly(tiny_data2, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data2, data)
    (data / "site-b" / "datalist.json").write_text("{ not json")
    ws = tmp_path / "run"
    with pytest.raises(RunFailed, match="exited with code"):
        run_and_report("lcfed", data, ws, preset="tiny", options={"rounds": 2}, show=quiet)
    log = (ws / "simulator.log").read_text()
    assert "site 'site-b'" in log and "datalist.json" in log and "malformed JSON" in log
    assert not (ws / "results").exists()


def test_a_workspace_with_a_previous_run_is_not_mixed_up(tiny_data2, tmp_path):
    ws = tmp_path / "run"
    (ws / "results").mkdir(parents=True)
    (ws / "results" / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_and_report("lcfed", tiny_data2, ws, preset="tiny", options={"rounds": 1}, show=quiet)
    assert (ws / "results" / "metrics.json").read_text() == "{}"  # nothing saved before is lost
