"""The benchmark's statistics and outputs, from synthetic runs (the runs themselves are simulator jobs)."""

import csv
import json

import numpy as np
import pytest

from lcfed.ops.bench import compare, per_seed, summarize, write_outputs

SITES = ["site-a", "site-b"]
METRICS = ("dice", "iou", "hd95", "assd")


def _run(algo: str, seed: int, case_dice: dict[str, list[float]], sent: float) -> dict:
    sites = {}
    for s in SITES:
        cases = {
            f"{s}-c{i}": {"dice": d, "iou": d / (2 - d), "hd95": 1.0, "assd": 0.5} for i, d in enumerate(case_dice[s])
        }
        sites[s] = {m: float(np.mean([c[m] for c in cases.values()])) for m in METRICS}
        sites[s].update(n_cases=len(cases), cases=cases)
    mean = {m: float(np.mean([sites[s][m] for s in SITES])) for m in METRICS}
    return {
        "algo": algo,
        "seed": seed,
        "sites": sites,
        "mean": mean,
        "distance_unit": "px",
        "histories": {},
        "traffic": {"from_site_mean": sent, "to_site_mean": sent + 100.0},
        "round_time": 2.0 + seed,
        "wall_time": 10.0,
    }


@pytest.fixture
def runs():
    rng = np.random.default_rng(0)
    out = []
    for seed in range(3):
        base = {s: list(0.70 + 0.05 * rng.random(8)) for s in SITES}
        out.append(_run("fedavg", seed, base, 1000.0))
        out.append(_run("local", seed, {s: [d - 0.10 for d in v] for s, v in base.items()}, 1.0))
        out.append(_run("lcfed", seed, {s: [d + 0.02 + 0.001 * seed for d in v] for s, v in base.items()}, 1025.0))
    return out


def test_summary_is_mean_and_std_over_seeds(runs):
    summary = summarize(runs)
    assert set(summary) == {"fedavg", "local", "lcfed"}
    lc = [r for r in runs if r["algo"] == "lcfed"]
    for s in SITES:
        vals = [r["sites"][s]["dice"] for r in lc]
        assert summary["lcfed"]["sites"][s]["dice"]["mean"] == pytest.approx(np.mean(vals))
        assert summary["lcfed"]["sites"][s]["dice"]["std"] == pytest.approx(np.std(vals))
    assert summary["lcfed"]["bytes_sent_per_round"] == 1025.0
    assert summary["lcfed"]["round_time"] == pytest.approx(3.0)


def test_comparison_picks_the_best_baseline_and_tests_over_cases(runs):
    c = compare(runs, summarize(runs))
    assert c["best_baseline"] == "fedavg"  # local is worse; LC-Fed variants are not baselines
    assert c["per_seed_difference"] == pytest.approx([0.02, 0.021, 0.022])
    assert c["n_cases"] == 16 and c["wilcoxon_p"] < 0.01  # every case better: a clear signed-rank result
    assert c["bytes_ratio"] == pytest.approx(1.025)


def test_outputs_hold_the_table_the_csv_and_the_plots(runs, tmp_path):
    summary = summarize(runs)
    write_outputs(tmp_path, runs, summary, compare(runs, summary), "python -m lcfed bench --data D --out O")
    table = (tmp_path / "table.md").read_text()
    assert "Command: `python -m lcfed bench --data D --out O`" in table
    assert "| lcfed |" in table and "vs best baseline fedavg" in table and "lcfed +2.50%" in table
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    dice = [r for r in rows if r["algorithm"] == "fedavg" and r["site"] == "mean" and r["metric"] == "dice"]
    assert float(dice[0]["mean"]) == pytest.approx(summary["fedavg"]["mean"]["dice"]["mean"], abs=1e-6)
    assert json.loads((tmp_path / "results.json").read_text())["comparison"]["best_baseline"] == "fedavg"
    assert (tmp_path / "bench.png").stat().st_size > 0


def _history(vals: list[float]) -> list[dict]:
    return [{"round": k, "val_dice": v} for k, v in enumerate(vals)]


def test_per_seed_finds_the_first_round_the_mean_validation_dice_reaches_the_threshold(runs, tmp_path):
    r = runs[0]
    r["histories"] = {"site-a": _history([0.6, 0.85, 0.9]), "site-b": _history([0.6, 0.7, 0.8])}
    r["sites"]["site-a"]["best_round"] = 2
    r["sites"]["site-b"]["best_round"] = 1
    stuck = runs[1]
    stuck["histories"] = {"site-a": _history([0.6, 0.65, 0.7]), "site-b": _history([0.6, 0.7, 0.79])}
    rows = {(x["algo"], x["seed"]): x for x in per_seed(runs)}
    assert rows[(r["algo"], 0)]["rounds_to_threshold"] == 3  # mean 0.6, 0.775, 0.85: 1-based round 3
    assert rows[(r["algo"], 0)]["best_rounds"] == [3, 2]
    assert rows[(stuck["algo"], 0)]["rounds_to_threshold"] is None
    assert rows[(r["algo"], 0)]["dice"] == pytest.approx(r["mean"]["dice"])
    summary = summarize(runs)
    write_outputs(tmp_path, runs, summary, compare(runs, summary), "cmd")
    table = (tmp_path / "table.md").read_text()
    assert f"| fedavg | {r['mean']['dice']:.3f} / 3 / 3,2 |" in table
    assert f"| local | {stuck['mean']['dice']:.3f} / - / " in table
    saved = json.loads((tmp_path / "results.json").read_text())["per_seed"]
    assert {(x["algo"], x["seed"]): x["rounds_to_threshold"] for x in saved}[("fedavg", 0)] == 3


def test_per_seed_measures_staged_hc_within_the_run(runs):
    r = runs[2]
    net = [{"round": k, "val_dice": 0.7} for k in range(3)]
    hc = [{"round": 3, "val_dice": 0.8, "hc_dice_loss": 0.2}, {"round": 4, "val_dice": 0.9, "hc_dice_loss": 0.1}]
    r["histories"] = {"site-a": net + hc, "site-b": net + hc}
    rows = per_seed(runs)
    row = next(x for x in rows if (x["algo"], x["seed"]) == (r["algo"], r["seed"]))
    assert row["hc_val_dice"] == pytest.approx((0.7, 0.9))
    assert all(x["hc_val_dice"] is None for x in rows if x is not row)
