"""``python -m lcfed bench``: every algorithm through FLARE's simulator, several seeds, one table per data set.

For each (data set, algorithm, seed) the job is exported and run in the simulator exactly like ``lcfed
run``; each site's selected checkpoint (best validation Dice) is evaluated on its test split. Finished
runs are kept under ``runs/<algo>/seed<k>/run.json`` and reused, so an interrupted benchmark resumes.
While it runs, every aggregated round prints which run it is (i of N: algorithm, seed, regime), the
round, the last mean validation Dice, the elapsed time and an estimate of what is left.

Several data sets ("regimes", e.g. ``--data rich=data/demo scarce=data/demo-scarce``) each get their own
folder ``OUT/<regime>/``; a single one writes straight into ``OUT`` (as before, so its runs are reused).
Per regime: ``results.json`` (everything), ``table.md`` and ``table.csv`` (per site and mean, mean +- std
over seeds, per class when there are several, rounds and wall time), ``bench.png`` (bars) and
``curves.png`` (mean validation Dice per round). ``OUT/summary.md`` and ``OUT/results.json`` (key
``overview``) give per regime the best method, its margin over the runner-up with a Wilcoxon test and
the rank of every LC-Fed variant.
Communication is measured on the serialized messages (:mod:`lcfed.runtime.fl.traffic`), wall time per round
on the server (:mod:`lcfed.runtime.fl.aggregator`). Paired tests are Wilcoxon signed-rank tests over test
cases (paired per case, each case's Dice averaged over seeds).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcfed.runtime.algorithms import BASELINES, get_algorithm
from lcfed.runtime.config import make_config
from lcfed.runtime.data.layout import DataError, load_dataset_info, write_json_atomic
from lcfed.runtime.metrics import METRIC_NAMES

__all__ = [
    "run_benchmark",
    "summarize",
    "compare",
    "paired",
    "overview",
    "per_seed",
    "round_counts",
    "write_outputs",
    "write_overview",
    "parse_data_sets",
    "parse_seeds",
    "parse_reuse",
    "import_runs",
]


def _traffic(sim_ws: Path) -> dict[str, Any]:
    path = sim_ws / "server" / "simulate_job" / "app_server" / "lcfed_traffic.json"
    if not path.is_file():
        return {}
    record = json.loads(path.read_text())
    out = {}
    for direction in ("from_site", "to_site"):
        per_site: dict[str, list[int]] = {}
        for e in record.get(direction, []):
            per_site.setdefault(e["site"], []).append(int(e["bytes"]))
        out[direction] = {s: float(np.mean(v)) for s, v in per_site.items()}
        out[direction + "_mean"] = float(np.mean([b for v in per_site.values() for b in v])) if per_site else 0.0
    return out


def _run_dir(out: Path, algo: str, seed: int) -> Path:
    return out / "runs" / algo / f"seed{seed}"


def _one_run(
    algo: str,
    seed: int,
    data_dir: Path,
    out: Path,
    preset: str,
    options: dict[str, Any],
    show: Callable[[str], None],
    on_round: Callable[[Any], None] | None = None,
    label: str = "",
    quantize: str = "",
) -> dict[str, Any]:
    from lcfed.ops.evaluation import evaluate_checkpoints
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import prepare_workspace, run_simulator, simulator_checkpoints

    ws = _run_dir(out, algo, seed)
    done = ws / "run.json"
    if done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("quantize", "") != quantize:
            raise ValueError(
                f"{done} was run with quantize={kept.get('quantize', '')!r}, not {quantize!r}: use another --out"
            )
        show(f"[bench] {label}: reusing {done}")
        return kept
    info = load_dataset_info(data_dir)
    spec = JobSpec(
        algorithm=algo,
        sites=list(info.sites),
        preset=preset,
        options={**options, "seed": seed},
        in_channels=info.channels,
        n_classes=info.n_classes,
        quantize=quantize,
    )
    config = make_config(preset, **spec.options)
    prepare_workspace(ws, overwrite=True)
    t0 = time.perf_counter()
    sim_ws = run_simulator(spec, data_dir, ws, show=lambda line: None, on_round=on_round)
    wall = time.perf_counter() - t0
    evaluation = evaluate_checkpoints(
        data_dir, simulator_checkpoints(ws / "models", spec.sites, spec.job_name), overlay_cases=0
    )
    rounds = json.loads((sim_ws / "server/simulate_job/app_server/lcfed_rounds.json").read_text())["rounds"]
    result = {
        "algo": algo,
        "seed": seed,
        "quantize": quantize,
        "sites": {s: {k: v for k, v in m.items()} for s, m in evaluation["sites"].items()},
        "mean": evaluation["mean"],
        "distance_unit": evaluation["distance_unit"],
        "class_names": evaluation["class_names"],
        "histories": evaluation["histories"],
        "traffic": _traffic(sim_ws),
        "round_time": float(np.mean([r["time"] for r in rounds])),
        "wall_time": wall,
        "rounds": len(rounds),
        # HC's own round budget, where the configuration has one (read defensively: older configs do not)
        "config_hc_rounds": int(getattr(config, "hc_rounds", 0) or 0),
    }
    write_json_atomic(done, result)
    sent_kb = result["traffic"].get("from_site_mean", 0) / 1e3
    show(
        f"[bench] {label}: mean Dice {result['mean']['dice']:.4f}, {result['round_time']:.1f} s/round, "
        f"{sent_kb:.1f} kB sent per site and round, {_duration(wall)}"
    )
    return result


def _duration(seconds: float) -> str:
    from lcfed.ops.run import format_duration

    return format_duration(seconds)


def round_counts(run: dict[str, Any]) -> tuple[int, int]:
    """(network rounds, HC rounds) of a run.

    HC rounds are the rounds in which every site trained HC alone (its history logs ``hc_dice_loss`` and
    no ``dice_loss``: the network frozen); network rounds are the others. Where the histories say nothing
    (no rounds recorded), the run's configured ``hc_rounds`` and its aggregated rounds stand in.
    """
    histories = [h for h in run.get("histories", {}).values() if h]
    n = min((len(h) for h in histories), default=0)
    if not n:
        total = int(run.get("rounds", 0))
        hc = int(run.get("config_hc_rounds", 0))
        return max(total - hc, 0), hc
    hc = sum(1 for k in range(n) if all("hc_dice_loss" in h[k] and "dice_loss" not in h[k] for h in histories))
    return n - hc, hc


def summarize(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per algorithm: per-site and mean metrics as mean and std over seeds, traffic and time."""
    by_algo: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_algo.setdefault(r["algo"], []).append(r)
    summary: dict[str, Any] = {}
    for algo, rs in by_algo.items():
        sites = list(rs[0]["sites"])
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "sites": {}, "mean": {}}
        for s in sites:
            entry["sites"][s] = {
                m: {
                    "mean": float(np.mean([r["sites"][s][m] for r in rs])),
                    "std": float(np.std([r["sites"][s][m] for r in rs])),
                }
                for m in METRIC_NAMES
            }
        entry["mean"] = {
            m: {"mean": float(np.mean([r["mean"][m] for r in rs])), "std": float(np.std([r["mean"][m] for r in rs]))}
            for m in METRIC_NAMES
        }
        entry["bytes_sent_per_round"] = float(np.mean([r["traffic"].get("from_site_mean", 0.0) for r in rs]))
        entry["bytes_received_per_round"] = float(np.mean([r["traffic"].get("to_site_mean", 0.0) for r in rs]))
        entry["round_time"] = float(np.mean([r["round_time"] for r in rs]))
        entry["wall_time"] = float(np.mean([r.get("wall_time", 0.0) for r in rs]))
        counts = [round_counts(r) for r in rs]
        entry["network_rounds"] = float(np.mean([c[0] for c in counts]))
        entry["hc_rounds"] = float(np.mean([c[1] for c in counts]))
        per_class = [r["mean"].get("per_class") for r in rs]
        if all(per_class) and len({len(pc["dice"]) for pc in per_class}) == 1:
            entry["per_class"] = {
                m: [{"mean": float(np.mean(v)), "std": float(np.std(v))} for v in zip(*[pc[m] for pc in per_class])]
                for m in METRIC_NAMES
                if all(m in pc for pc in per_class)
            }
        entry["description"] = get_algorithm(algo).description
        summary[algo] = entry
    return summary


def _case_dice(runs: Sequence[dict[str, Any]], algo: str) -> dict[tuple[str, str], float]:
    """Per (site, case) test Dice averaged over the seeds of ``algo``."""
    acc: dict[tuple[str, str], list[float]] = {}
    for r in runs:
        if r["algo"] != algo:
            continue
        for site, m in r["sites"].items():
            for case, cm in m.get("cases", {}).items():
                acc.setdefault((site, case), []).append(cm["dice"])
    return {k: float(np.mean(v)) for k, v in acc.items()}


def paired(runs: Sequence[dict[str, Any]], a: str, b: str) -> dict[str, Any]:
    """``a`` against ``b``: mean test Dice difference per seed and a Wilcoxon signed-rank test over cases.

    Cases are paired by (site, case); each case's Dice is averaged over the seeds of each algorithm. The
    p-value is 1.0 when fewer than two cases pair up or every pair is equal.
    """
    from scipy.stats import wilcoxon

    per_a = {r["seed"]: r["mean"]["dice"] for r in runs if r["algo"] == a}
    per_b = {r["seed"]: r["mean"]["dice"] for r in runs if r["algo"] == b}
    diffs = [per_a[s] - per_b[s] for s in sorted(set(per_a) & set(per_b))]
    ca, cb = _case_dice(runs, a), _case_dice(runs, b)
    keys = sorted(set(ca) & set(cb))
    x, y = np.array([ca[k] for k in keys]), np.array([cb[k] for k in keys])
    p = float(wilcoxon(x, y).pvalue) if len(keys) >= 2 and np.any(x != y) else 1.0
    return {
        "dice_difference_mean": float(np.mean(diffs)) if diffs else float("nan"),
        "dice_difference_std": float(np.std(diffs)) if diffs else float("nan"),
        "per_seed_difference": diffs,
        "n_cases": len(keys),
        "wilcoxon_p": p,
        "case_means": (float(x.mean()) if len(x) else float("nan"), float(y.mean()) if len(y) else float("nan")),
    }


def compare(runs: Sequence[dict[str, Any]], summary: dict[str, Any], lcfed: str = "lcfed") -> dict[str, Any] | None:
    """LC-Fed against the best baseline: difference of mean Dice per seed and a Wilcoxon test over cases."""
    baselines = [a for a in summary if a in BASELINES]
    if lcfed not in summary or not baselines:
        return None
    best = max(baselines, key=lambda a: summary[a]["mean"]["dice"]["mean"])
    test = paired(runs, lcfed, best)
    return {
        "lcfed": lcfed,
        "best_baseline": best,
        **{k: v for k, v in test.items() if k != "case_means"},
        "lcfed_case_mean": test["case_means"][0],
        "baseline_case_mean": test["case_means"][1],
        "bytes_ratio": summary[lcfed]["bytes_sent_per_round"] / max(summary[best]["bytes_sent_per_round"], 1.0),
    }


def overview(runs: Sequence[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """One regime at a glance: the ranking by mean test Dice, the best method's margin over the runner-up
    (with :func:`paired`'s Wilcoxon test) and the rank (1 = best) of every ``lcfed*`` algorithm."""
    ranking = sorted(summary, key=lambda a: -summary[a]["mean"]["dice"]["mean"])
    out: dict[str, Any] = {
        "ranking": ranking,
        "mean_dice": {a: summary[a]["mean"]["dice"]["mean"] for a in ranking},
        "best": ranking[0],
        "runner_up": ranking[1] if len(ranking) > 1 else None,
        "lcfed_ranks": {a: ranking.index(a) + 1 for a in ranking if a.startswith("lcfed")},
    }
    if len(ranking) > 1:
        test = paired(runs, ranking[0], ranking[1])
        out["margin"] = summary[ranking[0]]["mean"]["dice"]["mean"] - summary[ranking[1]]["mean"]["dice"]["mean"]
        out["margin_per_seed"] = test["per_seed_difference"]
        out["wilcoxon_p"] = test["wilcoxon_p"]
        out["n_cases"] = test["n_cases"]
    return out


def per_seed(runs: Sequence[dict[str, Any]], threshold: float = 0.8) -> list[dict[str, Any]]:
    """Per run: mean test Dice, how soon it trained (rounds are 1-based) and what staged HC added.

    ``rounds_to_threshold`` is the first round whose validation Dice, averaged over the sites, reaches
    ``threshold`` (None: never). A run that sits long on a plateau shows here before it shows in a mean.
    ``hc_val_dice`` is (before, after): the mean validation Dice before the first HC-only round and after
    the last (None for runs without HC-only rounds).
    """
    rows = []
    for r in runs:
        histories = [h for h in r.get("histories", {}).values() if h]
        n_rounds = min((len(h) for h in histories), default=0)
        first = None
        for k in range(n_rounds):
            vals = [h[k].get("val_dice") for h in histories]
            if all(v is not None for v in vals) and float(np.mean(vals)) >= threshold:
                first = k + 1
                break
        best = [m.get("best_round") for m in r["sites"].values() if m.get("best_round") is not None]
        # staged HC: rounds that trained HC alone log "hc_dice_loss"; the network is frozen in them, so the
        # validation Dice before the first and after the last is HC's own effect within the run
        hc_rounds = [k for k in range(n_rounds) if all("hc_dice_loss" in h[k] for h in histories)]
        hc = None
        if hc_rounds and hc_rounds[0] > 0 and hc_rounds == list(range(hc_rounds[0], n_rounds)):
            before = [h[hc_rounds[0] - 1].get("val_dice") for h in histories]
            after = [h[n_rounds - 1].get("val_dice") for h in histories]
            if all(v is not None for v in before + after):
                hc = (float(np.mean(before)), float(np.mean(after)))
        rows.append(
            {
                "algo": r["algo"],
                "seed": r["seed"],
                "dice": float(r["mean"]["dice"]),
                "rounds": n_rounds,
                "rounds_to_threshold": first,
                "threshold": threshold,
                "best_rounds": [int(b) + 1 for b in best],
                "hc_val_dice": hc,
            }
        )
    return rows


def _pm(entry: dict[str, float], digits: int) -> str:
    return f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}"


def _reused_lines(runs: list[dict[str, Any]]) -> list[str]:
    """Where runs were imported from earlier results (``--reuse-from``): which, from where, by which command."""
    origin: dict[tuple[str, str], dict[str, list[int]]] = {}
    for r in runs:
        src = r.get("reused_from")
        if src:
            origin.setdefault((src["file"], src.get("command", "")), {}).setdefault(r["algo"], []).append(r["seed"])
    if not origin:
        return []
    lines = ["", "Runs imported from earlier results (`--reuse-from`), measured by the command given:", ""]
    for (file, command), algos in origin.items():
        which = ", ".join(f"{a} (seeds {','.join(map(str, sorted(s)))})" for a, s in algos.items())
        lines.append(f"- {which}: `{file}`, measured with `{command}`")
    return lines


def write_outputs(
    out: Path,
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    comparison: dict[str, Any] | None,
    command: str,
    regime: str = "",
) -> None:
    """One regime's ``results.json``, ``table.md``, ``table.csv``, ``bench.png`` and ``curves.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    seeds = per_seed(runs)
    glance = overview(runs, summary)
    write_json_atomic(
        out / "results.json",
        {
            "command": command,
            "regime": regime,
            "summary": summary,
            "comparison": comparison,
            "overview": glance,
            "per_seed": seeds,
            "runs": runs,
        },
    )
    algos = list(summary)
    sites = list(next(iter(summary.values()))["sites"])
    unit = runs[0].get("distance_unit", "px") if runs else "px"
    lines = [f"## {regime}", ""] if regime else []
    lines += [
        f"Command: `{command}`",
        "",
        f"Mean ± std over seeds {summary[algos[0]]['seeds']}; HD95/ASSD in {unit}; rounds: network rounds / "
        "HC-only rounds (network frozen); wall: the simulator run, mean over seeds.",
        "",
    ]
    head = [
        "algorithm",
        *[f"{s} Dice" for s in sites],
        "mean Dice",
        "mean IoU",
        "mean HD95",
        "mean ASSD",
        "kB sent/round/site",
        "kB received/round/site",
        "s/round",
        "rounds net/HC",
        "wall",
    ]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    with open(out / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["algorithm", "site", "metric", "mean", "std"])
        for a in algos:
            e = summary[a]
            row = [a] + [_pm(e["sites"][s]["dice"], 4) for s in sites]
            row += [
                _pm(e["mean"]["dice"], 4),
                _pm(e["mean"]["iou"], 4),
                _pm(e["mean"]["hd95"], 2),
                _pm(e["mean"]["assd"], 2),
            ]
            row += [
                f"{e['bytes_sent_per_round'] / 1e3:.1f}",
                f"{e['bytes_received_per_round'] / 1e3:.1f}",
                f"{e['round_time']:.1f}",
                f"{e['network_rounds']:g}/{e['hc_rounds']:g}",
                _duration(e["wall_time"]),
            ]
            lines.append("| " + " | ".join(row) + " |")
            for s in [*sites, "mean"]:
                src = e["mean"] if s == "mean" else e["sites"][s]
                for m in METRIC_NAMES:
                    w.writerow([a, s, m, f"{src[m]['mean']:.6f}", f"{src[m]['std']:.6f}"])
            w.writerow([a, "all", "bytes_sent_per_round", f"{e['bytes_sent_per_round']:.0f}", ""])
            w.writerow([a, "all", "seconds_per_round", f"{e['round_time']:.3f}", ""])
            w.writerow([a, "all", "network_rounds", f"{e['network_rounds']:g}", ""])
            w.writerow([a, "all", "hc_rounds", f"{e['hc_rounds']:g}", ""])
            w.writerow([a, "all", "wall_time_s", f"{e['wall_time']:.1f}", ""])
            for c, name in enumerate(_class_names(runs, e)):
                for m, values in e.get("per_class", {}).items():
                    w.writerow([a, f"mean/{name}", m, f"{values[c]['mean']:.6f}", f"{values[c]['std']:.6f}"])
    lines += _per_class_lines(runs, summary, unit)
    if len(glance["ranking"]) > 1:
        lines += ["", _overview_sentence(glance)]
    if comparison:
        c = comparison
        lines += [
            "",
            f"{c['lcfed']} vs best baseline {c['best_baseline']}: mean Dice difference "
            f"{c['dice_difference_mean']:+.4f} ± {c['dice_difference_std']:.4f} over seeds; Wilcoxon signed-rank over "
            f"{c['n_cases']} test cases (Dice averaged over seeds): p = {c['wilcoxon_p']:.3g}; bytes sent per round "
            f"{c['bytes_ratio']:.4f}x the baseline's.",
        ]
    lcfed_variants = [a for a in algos if a.startswith("lcfed")]
    if "fedavg" in summary and lcfed_variants:
        base = max(summary["fedavg"]["bytes_sent_per_round"], 1.0)
        ratios = ", ".join(f"{a} {summary[a]['bytes_sent_per_round'] / base - 1:+.2%}" for a in lcfed_variants)
        lines += ["", f"Bytes sent per site and round, measured on the wire, against FedAvg: {ratios}."]
    if seeds and any(r["rounds"] for r in seeds):
        lines += [
            "",
            f"Per seed: mean test Dice / first round whose mean validation Dice reached {seeds[0]['threshold']:.2f}"
            " (- never) / rounds the sites' checkpoints were chosen from.",
            "",
            "| algorithm | " + " | ".join(f"seed {k}" for k in summary[algos[0]]["seeds"]) + " |",
            "|---|" + "---|" * len(summary[algos[0]]["seeds"]),
        ]
        by_run = {(r["algo"], r["seed"]): r for r in seeds}
        for a in algos:
            cells = []
            for k in summary[a]["seeds"]:
                row = by_run[(a, k)]
                first = "-" if row["rounds_to_threshold"] is None else str(row["rounds_to_threshold"])
                best = ",".join(str(b) for b in row["best_rounds"])
                cells.append(f"{row['dice']:.3f} / {first} / {best}")
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        staged = [r for r in seeds if r["hc_val_dice"] is not None]
        if staged:
            effect = "; ".join(
                f"{r['algo']} seed {r['seed']} {r['hc_val_dice'][0]:.3f} -> {r['hc_val_dice'][1]:.3f}" for r in staged
            )
            lines += [
                "",
                "Staged HC within each run (network frozen in the HC rounds), mean validation Dice before the first"
                f" HC round -> after the last: {effect}.",
            ]
    lines += _reused_lines(runs)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plots(out, runs, summary, sites)


def _class_names(runs: Sequence[dict[str, Any]], entry: dict[str, Any]) -> list[str]:
    """The data set's class names (dataset.json labels) for an algorithm's per-class values."""
    n = len(next(iter(entry.get("per_class", {}).values()), []))
    names = next((r.get("class_names") for r in runs if r.get("class_names")), None) or []
    return list(names) if len(names) == n else [f"class {c}" for c in range(n)]


def _per_class_lines(runs: Sequence[dict[str, Any]], summary: dict[str, Any], unit: str) -> list[str]:
    """Markdown table of each class's Dice, IoU, HD95, ASSD (mean over sites; mean ± std over seeds)."""
    algos = [a for a in summary if "per_class" in summary[a]]
    if not algos or len(algos) != len(summary):
        return []
    names = _class_names(runs, summary[algos[0]])
    if len(names) < 2 or any(_class_names(runs, summary[a]) != names for a in algos):
        return []
    head = ["algorithm"] + [f"{n} {m}" for n in names for m in ("Dice", "IoU", "HD95", "ASSD")]
    lines = [
        "",
        f"Per class (mean over sites; mean Dice above is the mean over these classes); HD95/ASSD in {unit}:",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for a in algos:
        pc = summary[a]["per_class"]
        cells = [
            _pm(pc[m][c], 4 if m in ("dice", "iou") else 2) if m in pc else "n/a"
            for c in range(len(names))
            for m in METRIC_NAMES
        ]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return lines


def _overview_sentence(glance: dict[str, Any]) -> str:
    ranks = ", ".join(f"{a} {r}" for a, r in glance["lcfed_ranks"].items()) or "none run"
    seeds = ", ".join(f"{d:+.4f}" for d in glance.get("margin_per_seed", []))
    return (
        f"Best: {glance['best']} ({glance['mean_dice'][glance['best']]:.4f}), {glance['margin']:+.4f} mean Dice over "
        f"the runner-up {glance['runner_up']} (per seed {seeds}; Wilcoxon signed-rank over {glance['n_cases']} "
        f"test cases p = {glance['wilcoxon_p']:.3g}). Rank of each LC-Fed variant of {len(glance['ranking'])}: "
        f"{ranks}."
    )


def write_overview(out: Path, regimes: dict[str, dict[str, Any]], command: str) -> None:
    """``summary.md`` and ``results.json`` (key ``overview``) over every regime of a benchmark.

    ``regimes`` maps a regime's name to ``{"data", "table", "overview"}`` (see :func:`overview`).
    """
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Benchmark summary",
        "",
        f"Command: `{command}`",
        "",
        "Per regime (data set): the best method by mean test Dice over sites and seeds, its margin over the "
        "runner-up with a Wilcoxon signed-rank test over test cases (each case's Dice averaged over seeds), "
        "and the rank of every LC-Fed variant (1 = best).",
        "",
        "| regime | data | best | mean Dice | runner-up | margin | Wilcoxon p | LC-Fed ranks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in regimes.items():
        g = r["overview"]
        ranks = ", ".join(f"{a} {k}/{len(g['ranking'])}" for a, k in g["lcfed_ranks"].items()) or "-"
        if g["runner_up"] is None:
            cells = [name, r["data"], g["best"], f"{g['mean_dice'][g['best']]:.4f}", "-", "-", "-", ranks]
        else:
            cells = [
                name,
                r["data"],
                g["best"],
                f"{g['mean_dice'][g['best']]:.4f}",
                f"{g['runner_up']} ({g['mean_dice'][g['runner_up']]:.4f})",
                f"{g['margin']:+.4f}",
                f"{g['wilcoxon_p']:.3g}",
                ranks,
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Tables: " + ", ".join(f"`{r['table']}`" for r in regimes.values()), ""]
    (out / "summary.md").write_text("\n".join(lines))
    path = out / "results.json"
    record = json.loads(path.read_text()) if path.is_file() else {}
    if len(regimes) > 1:  # a single regime's results.json is in OUT itself: add to it
        record = {"command": command}
    record["overview"] = regimes
    write_json_atomic(path, record)


def _plots(out: Path, runs: list[dict[str, Any]], summary: dict[str, Any], sites: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(summary)
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(algos) * (len(sites) + 1) / 3), 4.5))
    width = 0.8 / (len(sites) + 1)
    xs = np.arange(len(algos))
    for j, s in enumerate([*sites, "mean"]):
        vals = [summary[a]["mean"]["dice"] if s == "mean" else summary[a]["sites"][s]["dice"] for a in algos]
        ax.bar(
            xs + j * width,
            [v["mean"] for v in vals],
            width,
            yerr=[v["std"] for v in vals],
            label=s,
            capsize=2,
            color="black" if s == "mean" else None,
        )
    ax.set_xticks(xs + width * len(sites) / 2, algos, rotation=30, ha="right")
    lo = min(summary[a]["sites"][s]["dice"]["mean"] for a in algos for s in sites)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("test Dice (mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=len(sites) + 1)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bench.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for a in algos:
        curves = []
        for r in runs:
            if r["algo"] != a:
                continue
            per_round: dict[int, list[float]] = {}
            for hist in r["histories"].values():
                for h in hist:
                    if "val_dice" in h:
                        per_round.setdefault(h["round"], []).append(h["val_dice"])
            curves.append([np.mean(per_round[k]) for k in sorted(per_round)])
        n = min(len(c) for c in curves)
        ax.plot(np.arange(1, n + 1), np.mean([c[:n] for c in curves], axis=0), label=a)
    ax.set(xlabel="round", ylabel="mean validation Dice over sites", title="learning curves (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def parse_data_sets(values: Sequence[str] | str | os.PathLike) -> dict[str, Path]:
    """``--data`` values as ``{regime: folder}``: each ``NAME=DIR`` or a bare ``DIR``.

    A bare folder is named after its data set: the demo builder's regime (``rich`` for the default demo,
    whose dataset.json predates regimes), else the folder's name. Names must be unique.
    """
    if isinstance(values, (str, os.PathLike)):
        values = [str(values)]
    out: dict[str, Path] = {}
    for value in values:
        name, sep, folder = str(value).partition("=")
        if not sep:
            folder, name = name, ""
        path = Path(folder)
        if not name:
            info = load_dataset_info(path)
            regime = info.extra.get("regime")
            name = regime or ("rich" if info.extra.get("generator") == "lcfed.ops.data.demo" else path.name)
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"--data {value!r}: a regime name must be a plain folder name")
        if name in out:
            raise ValueError(f"--data names the regime {name!r} twice ({out[name]} and {path}); use NAME=DIR")
        out[name] = path
    if not out:
        raise ValueError("--data needs at least one data set folder")
    return out


def parse_seeds(text: str) -> list[int]:
    """``--seeds``: a count ``N`` (seeds 0..N-1) or a comma-separated list (one seed ``k``: ``k,``)."""
    text = str(text).strip()
    if text.isdigit():
        if int(text) < 1:
            raise ValueError(f"--seeds {text}: a count is at least 1 (the single seed {text} is written '{text},')")
        return list(range(int(text)))
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give a count N or a comma-separated list of seeds, e.g. 0,2") from None
    if not seeds or any(k < 0 for k in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: give a count N or distinct non-negative seeds, e.g. 0,2")
    return seeds


def parse_reuse(values: Sequence[str]) -> list[tuple[str, Path, set[str] | None]]:
    """``--reuse-from`` values ``[REGIME=]RESULTS.json[@ALGO,ALGO]`` as ``(regime, file, algorithms or None)``.

    Without ``REGIME=`` the file's own ``regime`` (``rich`` where it predates regimes) is used; without
    ``@ALGOS`` every algorithm of the file may be reused.
    """
    return [entry[:3] for entry in _load_reuse(values)]


def _load_reuse(values: Sequence[str]) -> list[tuple[str, Path, set[str] | None, dict[str, Any]]]:
    """:func:`parse_reuse`'s entries with each file's parsed record (read once, for :func:`import_runs`)."""
    out = []
    for value in values:
        name, sep, rest = str(value).partition("=")
        if not sep:
            name, rest = "", name
        file, at, names = rest.partition("@")
        path = Path(file)
        if not path.is_file():
            raise ValueError(f"--reuse-from {value!r}: {path} is not a file (an earlier bench's results.json)")
        try:
            record = json.loads(path.read_text())
            runs = record["runs"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"--reuse-from {value!r}: {path} is not a bench results.json (no 'runs')") from None
        if not isinstance(runs, list):
            raise ValueError(f"--reuse-from {value!r}: {path} is not a bench results.json ('runs' is not a list)")
        algos = {a.strip() for a in names.split(",") if a.strip()} if at else None
        if at and not algos:
            raise ValueError(f"--reuse-from {value!r}: no algorithm after '@'")
        for a in algos or ():
            get_algorithm(a)
        out.append((name or record.get("regime") or "rich", path, algos, record))
    return out


def import_runs(
    reuse: Sequence[tuple[str, Path, set[str] | None, dict[str, Any]]],
    plan: Sequence[tuple[str, str, int]],
    folders: dict[str, Path],
    quantize: str,
    show: Callable[[str], None],
) -> int:
    """Write, for each planned run not finished yet, the first matching run of the ``reuse`` files as its run.json.

    ``reuse``: ``(regime, file, algorithms or None, the file's parsed record)`` per ``--reuse-from`` value.

    A run matches on regime, algorithm, seed and quantization. The copy records where it came from
    (``reused_from``: the file and the command that measured it), and the tables name it. Returns how many
    were imported.
    """
    imported = 0
    for name, algo, seed in plan:
        done = _run_dir(folders[name], algo, seed) / "run.json"
        if done.is_file():
            continue
        for regime, path, algos, record in reuse:
            if regime != name or (algos is not None and algo not in algos):
                continue
            match = [
                r
                for r in record["runs"]
                if r.get("algo") == algo and r.get("seed") == seed and r.get("quantize", "") == quantize
            ]
            if match:
                origin = {"file": str(path), "command": record.get("command", "")}
                run = {**match[0], "quantize": quantize, "reused_from": origin}
                write_json_atomic(done, run)
                show(f"[bench] {algo}, seed {seed}, {name}: imported from {path}")
                imported += 1
                break
    return imported


def run_benchmark(
    data_dir: str | os.PathLike | Sequence[str] | dict[str, str | os.PathLike],
    algos: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    preset: str = "demo",
    options: dict[str, Any] | None = None,
    command: str = "",
    show: Callable[[str], None] | None = None,
    quantize: str = "",
    reuse_from: Sequence[str] = (),
) -> dict[str, Any]:
    """Run every (data set, algorithm, seed), then write each regime's tables and the summary.

    ``data_dir``: one folder, ``--data`` values (see :func:`parse_data_sets`) or ``{regime: folder}``.
    ``quantize``: see ``JobSpec``. ``reuse_from``: ``--reuse-from`` values (see :func:`parse_reuse`), earlier
    results whose runs stand in for planned runs not finished yet (see :func:`import_runs`).
    Returns ``{"summary", "comparison", "overview"}`` of a single regime, or
    ``{"regimes": {name: that}}``.
    """
    from lcfed.ops.run import RoundProgress, format_duration, show_line

    show = show or show_line
    for a in algos:
        get_algorithm(a)  # unknown names fail before hours of runs
    data_sets = {k: Path(v) for k, v in data_dir.items()} if isinstance(data_dir, dict) else parse_data_sets(data_dir)
    for name, folder in data_sets.items():
        if not (folder / "dataset.json").is_file():
            raise DataError(f"regime {name!r}: {folder} holds no dataset.json (build or import a data set first)")
    out = Path(out)
    single = len(data_sets) == 1
    folders = {name: out if single else out / name for name in data_sets}
    plan = [(name, a, s) for name in data_sets for a in algos for s in seeds]
    reuse = _load_reuse(reuse_from)
    for regime, path, _, _ in reuse:
        if regime not in data_sets:
            known = ", ".join(data_sets)
            raise ValueError(f"--reuse-from {path}: its regime {regime!r} is not one of --data ({known})")
    import_runs(reuse, plan, folders, quantize, show)
    to_run = [p for p in plan if not (_run_dir(folders[p[0]], p[1], p[2]) / "run.json").is_file()]
    show(
        f"[bench] {len(plan)} runs ({len(data_sets)} regime(s) x {len(algos)} algorithm(s) x {len(seeds)} seed(s)); "
        f"{len(plan) - len(to_run)} finished before and reused, {len(to_run)} to run"
    )
    t_bench = time.perf_counter()
    finished_walls: list[float] = []
    results: dict[str, Any] = {}
    runs_by_regime: dict[str, list[dict[str, Any]]] = {name: [] for name in data_sets}
    for i, (name, a, s) in enumerate(plan, 1):
        label = f"run {i}/{len(plan)} ({a}, seed {s}, {name})"
        left_after = sum(1 for p in to_run if plan.index(p) >= i)  # runs still to do after this one

        def on_round(progress: RoundProgress, label: str = label, left_after: int = left_after) -> None:
            # what is left of the benchmark: this run, then the others at the mean pace of finished runs
            # (this run's projected total until one has finished)
            pace = float(np.mean(finished_walls)) if finished_walls else progress.elapsed + progress.remaining
            total_left = progress.remaining + left_after * pace
            show(
                f"[bench] {label} {progress.describe()}; bench {format_duration(time.perf_counter() - t_bench)} "
                f"elapsed, ~{format_duration(total_left)} left"
            )

        t0 = time.perf_counter()
        fresh = (name, a, s) in to_run
        run = _one_run(
            a, s, data_sets[name].resolve(), folders[name], preset, dict(options or {}), show, on_round, label, quantize
        )
        if fresh:
            finished_walls.append(time.perf_counter() - t0)
        runs_by_regime[name].append(run)
    regimes_overview: dict[str, dict[str, Any]] = {}
    for name, runs in runs_by_regime.items():
        summary = summarize(runs)
        comparison = compare(runs, summary)
        write_outputs(folders[name], runs, summary, comparison, command, regime=name)
        glance = overview(runs, summary)
        results[name] = {"summary": summary, "comparison": comparison, "overview": glance}
        regimes_overview[name] = {
            "data": str(data_sets[name]),
            "table": str(folders[name] / "table.md"),
            "overview": glance,
        }
        show((folders[name] / "table.md").read_text())
    write_overview(out, regimes_overview, command)
    show((out / "summary.md").read_text())
    return next(iter(results.values())) if single else {"regimes": results}
