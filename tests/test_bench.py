"""The benchmark's statistics and outputs, from synthetic runs (the runs themselves are simulator jobs)."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from lcfed.ops.bench import (
    compare,
    overview,
    parse_data_sets,
    per_seed,
    round_counts,
    run_benchmark,
    summarize,
    write_outputs,
)
from lcfed.ops.run import RoundProgress, format_duration

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


def _with_classes(run: dict, per_class_dice: list[float]) -> dict:
    """The run's mean over sites with per-class values (two classes, as the demo's tissue and wm)."""
    run["mean"]["per_class"] = {
        "dice": per_class_dice,
        "iou": [d / (2 - d) for d in per_class_dice],
        "hd95": [1.0, 3.0],
        "assd": [0.5, 1.5],
    }
    run["class_names"] = ["tissue", "wm"]
    return run


def test_overview_ranks_every_method_and_tests_the_best_against_the_runner_up(runs):
    glance = overview(runs, summarize(runs))
    assert glance["ranking"] == ["lcfed", "fedavg", "local"]
    assert (glance["best"], glance["runner_up"]) == ("lcfed", "fedavg")
    assert glance["margin"] == pytest.approx(0.021)  # 0.02 + 0.001 * seed, mean over seeds 0..2
    assert glance["margin_per_seed"] == pytest.approx([0.02, 0.021, 0.022])
    assert glance["n_cases"] == 16 and glance["wilcoxon_p"] < 0.01
    assert glance["lcfed_ranks"] == {"lcfed": 1}


def test_round_counts_tell_network_rounds_from_hc_only_rounds(runs):
    net = [{"round": k, "dice_loss": 0.3, "hc_dice_loss": 0.3} for k in range(3)]  # joint HC: network rounds
    hc = [{"round": k, "hc_dice_loss": 0.2} for k in (3, 4)]  # staged: network frozen
    r = runs[2]
    r["histories"] = {"site-a": net + hc, "site-b": net + hc}
    assert round_counts(r) == (3, 2)
    # no history recorded: the configured HC budget and the aggregated rounds stand in
    assert round_counts({"histories": {}, "rounds": 10, "config_hc_rounds": 4}) == (6, 4)
    summary = summarize(runs)
    assert (summary["lcfed"]["network_rounds"], summary["lcfed"]["hc_rounds"]) == (pytest.approx(1.0), 2 / 3)
    assert summary["lcfed"]["wall_time"] == pytest.approx(10.0)


def test_tables_give_each_class_beside_the_mean_and_rounds_and_wall_time(runs, tmp_path):
    for r in runs:
        _with_classes(r, [0.9, 0.6] if r["algo"] != "local" else [0.8, 0.5])
    summary = summarize(runs)
    assert summary["fedavg"]["per_class"]["dice"][1] == {"mean": pytest.approx(0.6), "std": pytest.approx(0.0)}
    write_outputs(tmp_path, runs, summary, compare(runs, summary), "cmd", regime="scarce")
    table = (tmp_path / "table.md").read_text()
    assert table.startswith("## scarce")
    assert "| algorithm | tissue Dice | tissue IoU | tissue HD95 | tissue ASSD | wm Dice |" in table
    assert "| local | 0.8000 ± 0.0000 | 0.6667 ± 0.0000 | 1.00 ± 0.00 | 0.50 ± 0.00 | 0.5000 ± 0.0000 |" in table
    assert "rounds net/HC" in table and "| 0/0 | 10s |" in table
    assert "Best: lcfed" in table and "runner-up fedavg" in table
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    wm = [r for r in rows if r["algorithm"] == "local" and r["site"] == "mean/wm" and r["metric"] == "dice"]
    assert float(wm[0]["mean"]) == pytest.approx(0.5)


def test_parse_data_sets_names_regimes(tiny_data, tmp_path):
    # a demo set built before regimes existed (no "regime" in dataset.json) is the rich one
    assert parse_data_sets([tiny_data]) == {"rich": Path(tiny_data)}
    assert parse_data_sets([f"small={tiny_data}", f"other={tiny_data}"]) == {
        "small": Path(tiny_data),
        "other": Path(tiny_data),
    }
    with pytest.raises(ValueError, match="twice"):
        parse_data_sets([tiny_data, f"rich={tmp_path}"])
    with pytest.raises(ValueError, match="plain folder name"):
        parse_data_sets([f"a/b={tiny_data}"])


def test_bench_over_regimes_reuses_finished_runs_and_writes_a_summary(runs, tiny_data, tmp_path):
    out = tmp_path / "bench"
    worse = {s: [0.5] * 8 for s in SITES}
    for regime in ("rich", "scarce"):
        for r in runs:
            if regime == "scarce" and r["algo"] == "local":
                r = _run("local", r["seed"], worse, 1.0)  # local far behind in the scarce regime
            path = out / regime / "runs" / r["algo"] / f"seed{r['seed']}" / "run.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(r))
    lines: list[str] = []
    result = run_benchmark(
        [f"rich={tiny_data}", f"scarce={tiny_data}"],
        ["fedavg", "local", "lcfed"],
        [0, 1, 2],
        out,
        command="python -m lcfed bench ...",
        show=lines.append,
    )
    assert "18 runs" in lines[0] and "18 finished before and reused, 0 to run" in lines[0]
    assert any(line.startswith("[bench] run 18/18 (lcfed, seed 2, scarce): reusing") for line in lines)
    assert set(result["regimes"]) == {"rich", "scarce"}
    for regime in ("rich", "scarce"):
        assert (out / regime / "table.md").read_text().startswith(f"## {regime}")
    summary = (out / "summary.md").read_text()
    assert "| rich |" in summary and "| scarce |" in summary and "lcfed 1/3" in summary
    saved = json.loads((out / "results.json").read_text())["overview"]
    assert saved["scarce"]["overview"]["ranking"][-1] == "local"
    assert saved["rich"]["overview"]["best"] == "lcfed"


SERVER_LINE = (
    "2025-01-01 10:00:00,000 - LCFedAggregator - INFO - [identity=simulator_server] - round {r}: aggregated 4 "
    "site(s) (site-a 0.8000, site-b 0.7000); mean val dice {d}; head bank ['site-a', 'site-b']"
)


def test_round_progress_reads_the_servers_round_lines():
    p = RoundProgress(16)
    assert not p.update("site site-a round 1/16: dice_loss 0.5; train 1.0 s")
    assert p.remaining == 0.0  # nothing to extrapolate from yet
    p.started -= 30.0  # as if the first three rounds took 30 s
    assert p.update(SERVER_LINE.format(r=0, d="0.7500")) and p.update(SERVER_LINE.format(r=2, d="0.8125"))
    assert (p.round, p.mean_val_dice) == (3, pytest.approx(0.8125))
    assert p.remaining == pytest.approx(p.elapsed / 3 * 13, rel=0.01)
    text = p.describe()
    assert text.startswith("round 3/16, mean val Dice 0.8125, 30s elapsed, ~2m") and text.endswith(" left")
    assert p.update(SERVER_LINE.format(r=3, d="nan")) and "mean val Dice n/a" in p.describe()


def test_resumed_run_extrapolates_from_the_rounds_this_process_ran():
    p = RoundProgress(10)
    p.started -= 20.0
    p.update(SERVER_LINE.format(r=7, d="0.9"))  # resumed after round 7: two rounds of this process
    p.update(SERVER_LINE.format(r=8, d="0.9"))
    assert p.round == 9 and p.remaining == pytest.approx(p.elapsed / 2 * 1, rel=0.01)


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (42.4, "42s"), (185, "3m05s"), (3720, "1h02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_bench_command_line_takes_several_data_sets():
    from lcfed.ops.cli import build_parser

    args = build_parser().parse_args(["bench", "--data", "rich=a", "scarce=b", "--data", "c", "--out", "o"])
    assert [d for group in args.data for d in group] == ["rich=a", "scarce=b", "c"]


def test_parse_seeds_takes_a_count_or_a_list_and_refuses_none():
    from lcfed.ops.bench import parse_seeds

    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("0,2") == [0, 2]
    assert parse_seeds("2,") == [2]  # one seed
    for bad, why in (("0", "at least 1"), ("a", "comma-separated"), ("1,1", "distinct"), (",", "distinct")):
        with pytest.raises(ValueError, match=why):
            parse_seeds(bad)


def test_reuse_from_imports_matching_runs_with_their_origin(runs, tiny_data, tmp_path):
    earlier = tmp_path / "earlier" / "results.json"
    earlier.parent.mkdir()
    earlier.write_text(json.dumps({"command": "python -m lcfed bench --seeds 3 ...", "regime": "rich", "runs": runs}))
    out = tmp_path / "bench"
    # lcfed seed 0 already finished here: kept, not replaced by the earlier file's
    mine = _run("lcfed", 0, {s: [0.99] * 8 for s in SITES}, 5.0)
    (out / "runs/lcfed/seed0").mkdir(parents=True)
    (out / "runs/lcfed/seed0/run.json").write_text(json.dumps(mine))
    lines: list[str] = []
    run_benchmark(
        [f"rich={tiny_data}"],
        ["fedavg", "local", "lcfed"],
        [0, 1, 2],
        out,
        command="python -m lcfed bench ...",
        show=lines.append,
        reuse_from=[f"{earlier}@fedavg,lcfed", f"rich={earlier}@local"],
    )
    imported = [line for line in lines if line.startswith("[bench]") and "imported from" in line]
    assert len(imported) == 8  # 9 planned, lcfed seed 0 finished before
    assert "9 finished before and reused, 0 to run" in lines[8]
    saved = {(r["algo"], r["seed"]): r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert saved[("lcfed", 0)]["mean"]["dice"] == pytest.approx(0.99) and "reused_from" not in saved[("lcfed", 0)]
    origin = {"file": str(earlier), "command": "python -m lcfed bench --seeds 3 ..."}
    assert saved[("fedavg", 1)]["reused_from"] == origin
    assert saved[("local", 2)]["mean"] == next(r for r in runs if r["algo"] == "local" and r["seed"] == 2)["mean"]
    table = (out / "table.md").read_text()
    assert "fedavg (seeds 0,1,2), local (seeds 0,1,2), lcfed (seeds 1,2)" in table and str(earlier) in table


def test_reuse_from_refuses_what_it_cannot_use(runs, tiny_data, tmp_path):
    from lcfed.ops.bench import parse_reuse

    good = tmp_path / "results.json"
    good.write_text(json.dumps({"regime": "scarce", "runs": runs}))
    assert parse_reuse([str(good)]) == [("scarce", good, None)]
    assert parse_reuse([f"rich={good}@lcfed"]) == [("rich", good, {"lcfed"})]
    (tmp_path / "table.md").write_text("| not json |")
    for value, why in (
        (str(tmp_path / "missing.json"), "is not a file"),
        (str(tmp_path / "table.md"), "not a bench results.json"),
        (f"{good}@", "no algorithm"),
        (f"{good}@nonsense", "nonsense"),
    ):
        with pytest.raises(ValueError, match=why):
            parse_reuse([value])
    with pytest.raises(ValueError, match="'scarce' is not one of --data"):
        run_benchmark([f"rich={tiny_data}"], ["lcfed"], [0], tmp_path / "b", reuse_from=[str(good)], show=print)


def test_scaling_script_times_the_head_bank_of_an_hc_step(tiny_data2):
    """benchmark/scaling.py's in-process part runs against the current trainer (it broke once, unseen)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmark" / "scaling.py"
    spec = importlib.util.spec_from_file_location("scaling", path)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    out = scaling.bank_share(3, "tiny", 2, Path(tiny_data2))
    assert out["sites"] == 3 and out["steps"] == 2
    assert 0.0 < out["bank_ms"] < out["step_ms"] and 0.0 < out["bank_share"] < 1.0  # the bank was called and timed
    from lcfed.runtime.config import make_config

    tiny = make_config("tiny")
    assert out["hc_rounds_share"] == pytest.approx(tiny.hc_stage_rounds / (tiny.rounds + tiny.hc_stage_rounds))
