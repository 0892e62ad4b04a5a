"""``python -m lcfed bench``: every algorithm through FLARE's simulator, several seeds, one table.

For each (algorithm, seed) the job is exported and run in the simulator exactly like ``lcfed run``;
each site's selected checkpoint (best validation Dice) is evaluated on its test split. Finished runs
are kept under ``OUT/runs/<algo>/seed<k>/run.json`` and reused, so an interrupted benchmark resumes.

Outputs in ``OUT``: ``results.json`` (everything), ``table.md`` and ``table.csv`` (per site and mean,
mean +- std over seeds), ``bench.png`` (bars) and ``curves.png`` (mean validation Dice per round).
Communication is measured on the serialized messages (:mod:`lcfed.runtime.fl.traffic`), wall time per round
on the server (:mod:`lcfed.runtime.fl.aggregator`). LC-Fed is compared with the best baseline by a Wilcoxon
signed-rank test over test cases (paired per case, each case's Dice averaged over seeds).
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
from lcfed.runtime.data.layout import load_dataset_info, write_json_atomic
from lcfed.runtime.metrics import METRIC_NAMES

__all__ = ["run_benchmark", "summarize", "compare", "per_seed", "write_outputs"]


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


def _one_run(
    algo: str,
    seed: int,
    data_dir: Path,
    out: Path,
    preset: str,
    options: dict[str, Any],
    show: Callable[[str], None],
    quantize: str = "",
) -> dict[str, Any]:
    from lcfed.ops.evaluation import evaluate_checkpoints
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import prepare_workspace, run_simulator, simulator_checkpoints

    ws = out / "runs" / algo / f"seed{seed}"
    done = ws / "run.json"
    if done.is_file():
        kept = json.loads(done.read_text())
        if kept.get("quantize", "") != quantize:
            raise ValueError(
                f"{done} was run with quantize={kept.get('quantize', '')!r}, not {quantize!r}: use another --out"
            )
        show(f"[bench] {algo} seed {seed}: reusing {done}")
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
    prepare_workspace(ws, overwrite=True)
    t0 = time.perf_counter()
    sim_ws = run_simulator(spec, data_dir, ws, show=lambda line: None)
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
        "histories": evaluation["histories"],
        "traffic": _traffic(sim_ws),
        "round_time": float(np.mean([r["time"] for r in rounds])),
        "wall_time": wall,
    }
    write_json_atomic(done, result)
    sent_kb = result["traffic"].get("from_site_mean", 0) / 1e3
    show(
        f"[bench] {algo} seed {seed}: mean Dice {result['mean']['dice']:.4f}, "
        f"{result['round_time']:.1f} s/round, {sent_kb:.1f} kB sent per site and round"
    )
    return result


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


def compare(runs: Sequence[dict[str, Any]], summary: dict[str, Any], lcfed: str = "lcfed") -> dict[str, Any] | None:
    """LC-Fed against the best baseline: difference of mean Dice per seed and a Wilcoxon test over cases."""
    from scipy.stats import wilcoxon

    baselines = [a for a in summary if a in BASELINES]
    if lcfed not in summary or not baselines:
        return None
    best = max(baselines, key=lambda a: summary[a]["mean"]["dice"]["mean"])
    per_seed = {r["seed"]: r["mean"]["dice"] for r in runs if r["algo"] == lcfed}
    base_seed = {r["seed"]: r["mean"]["dice"] for r in runs if r["algo"] == best}
    diffs = [per_seed[s] - base_seed[s] for s in sorted(set(per_seed) & set(base_seed))]
    a, b = _case_dice(runs, lcfed), _case_dice(runs, best)
    keys = sorted(set(a) & set(b))
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    p = float(wilcoxon(x, y).pvalue) if len(keys) >= 2 and np.any(x != y) else 1.0
    return {
        "lcfed": lcfed,
        "best_baseline": best,
        "dice_difference_mean": float(np.mean(diffs)) if diffs else float("nan"),
        "dice_difference_std": float(np.std(diffs)) if diffs else float("nan"),
        "per_seed_difference": diffs,
        "n_cases": len(keys),
        "wilcoxon_p": p,
        "lcfed_case_mean": float(x.mean()) if len(x) else float("nan"),
        "baseline_case_mean": float(y.mean()) if len(y) else float("nan"),
        "bytes_ratio": summary[lcfed]["bytes_sent_per_round"] / max(summary[best]["bytes_sent_per_round"], 1.0),
    }


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


def write_outputs(
    out: Path, runs: list[dict[str, Any]], summary: dict[str, Any], comparison: dict[str, Any] | None, command: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    seeds = per_seed(runs)
    write_json_atomic(
        out / "results.json",
        {"command": command, "summary": summary, "comparison": comparison, "per_seed": seeds, "runs": runs},
    )
    algos = list(summary)
    sites = list(next(iter(summary.values()))["sites"])
    unit = runs[0].get("distance_unit", "px") if runs else "px"
    lines = [
        f"Command: `{command}`",
        "",
        f"Mean ± std over seeds {summary[algos[0]]['seeds']}; HD95/ASSD in {unit}.",
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
            ]
            lines.append("| " + " | ".join(row) + " |")
            for s in [*sites, "mean"]:
                src = e["mean"] if s == "mean" else e["sites"][s]
                for m in METRIC_NAMES:
                    w.writerow([a, s, m, f"{src[m]['mean']:.6f}", f"{src[m]['std']:.6f}"])
            w.writerow([a, "all", "bytes_sent_per_round", f"{e['bytes_sent_per_round']:.0f}", ""])
            w.writerow([a, "all", "seconds_per_round", f"{e['round_time']:.3f}", ""])
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
    (out / "table.md").write_text("\n".join(lines) + "\n")
    _plots(out, runs, summary, sites)


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


def run_benchmark(
    data_dir: str | os.PathLike,
    algos: Sequence[str],
    seeds: Sequence[int],
    out: str | os.PathLike,
    preset: str = "demo",
    options: dict[str, Any] | None = None,
    command: str = "",
    show: Callable[[str], None] = print,
    quantize: str = "",
) -> dict[str, Any]:
    """Run every (algorithm, seed), then write the table, plots and statistics (``quantize``: see ``JobSpec``)."""
    for a in algos:
        get_algorithm(a)  # unknown names fail before hours of runs
    out = Path(out)
    data_dir = Path(data_dir).resolve()
    runs = [_one_run(a, s, data_dir, out, preset, dict(options or {}), show, quantize) for a in algos for s in seeds]
    summary = summarize(runs)
    comparison = compare(runs, summary)
    write_outputs(out, runs, summary, comparison, command)
    show((out / "table.md").read_text())
    return {"summary": summary, "comparison": comparison}
