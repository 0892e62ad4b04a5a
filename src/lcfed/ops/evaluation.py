"""Evaluate every site's personalized checkpoint on its own test split and write ``results/``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lcfed.ops.reports import plot_curves, plot_overlays, results_table, write_metrics
from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import TrainConfig
from lcfed.runtime.data.pipeline import load_site
from lcfed.runtime.metrics import METRIC_NAMES, case_metrics, mean_over_sites
from lcfed.runtime.trainer import SiteTrainer

__all__ = ["evaluate_checkpoints", "write_results", "print_table"]


def _overlay_indices(case_ids: list[str], slices: list[int], n_cases: int) -> list[tuple[str, int]]:
    """The middle slice of the first ``n_cases`` test cases: (case, index into the split)."""
    by_case: dict[str, list[tuple[int, int]]] = {}
    for i, (c, s) in enumerate(zip(case_ids, slices)):
        by_case.setdefault(c, []).append((s, i))
    out = []
    for c in list(by_case)[:n_cases]:
        ordered = sorted(by_case[c])
        out.append((c, ordered[len(ordered) // 2][1]))
    return out


def evaluate_checkpoints(
    data_dir: str | os.PathLike,
    checkpoints: Mapping[str, str | os.PathLike],
    overlay_cases: int = 2,
    device: str | None = None,
) -> dict[str, Any]:
    """Test metrics of each site's checkpoint on its own test split, learning histories and overlay panels.

    Returns ``{"algo", "sites": {site: {dice, iou, hd95, assd, per_class, n_cases, best_round,
    best_val_dice, cases}}, "mean": {...}, "distance_unit", "histories", "panels", "class_names"}``;
    ``per_class`` holds each metric per class, in the order of the data set's labels (``class_names``).
    """
    sites_out: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, Any]]] = {}
    panels: list[dict[str, Any]] = []
    algo_name = None
    units = set()
    class_names: list[str] = []
    for site, path in checkpoints.items():
        state = torch.load(path, map_location="cpu", weights_only=True)
        ident = state["identity"]
        algo_name = ident["algorithm"]
        config = TrainConfig.from_dict(state["config"])
        data = load_site(data_dir, site, config.size, splits=("testing",))
        class_names = list(data.info.labels)
        trainer = SiteTrainer(get_algorithm(algo_name), config, data, ident["sites"], site, device)
        trainer.load_state_dict(state, source=str(path))
        m = trainer.evaluate("testing")
        meta = state.get("meta", {})
        sites_out[site] = {name: m[name] for name in METRIC_NAMES}
        sites_out[site]["per_class"] = m["per_class"]
        sites_out[site].update(
            n_cases=m["n_cases"], best_round=meta.get("round"), best_val_dice=meta.get("val_dice"), cases=m["cases"]
        )
        units.add("mm" if data.spacing else "px")
        # the run's full per-round record sits beside the checkpoint (best.pt holds it only up to its round)
        history_file = Path(path).parent / "history.json"
        histories[site] = json.loads(history_file.read_text()) if history_file.is_file() else trainer.history
        test = data.splits["testing"]
        picks = _overlay_indices(test.case_ids, test.slices, overlay_cases)
        if picks:
            maps = trainer.explain("testing", [i for _, i in picks])
            for j, (case, i) in enumerate(picks):
                pred = maps["prediction"][j].numpy()
                label = test.labels[i].numpy()
                panels.append(
                    {
                        "site": site,
                        "case": f"{case} slice {test.slices[i]}",
                        "image": test.images[i].numpy(),
                        "label": label,
                        "prediction": pred,
                        "disagreement": maps["disagreement"][j].numpy() if "disagreement" in maps else None,
                        "peaks": maps["peaks"][j].numpy() if "peaks" in maps else None,
                        "calibrated": bool(maps["calibrated"][j]) if "calibrated" in maps else False,
                        "dice": case_metrics(pred >= 0.5, label > 0.5, surface=False)["dice"],
                    }
                )
    mean = mean_over_sites(sites_out)
    return {
        "algo": algo_name,
        "sites": sites_out,
        "mean": mean,
        "distance_unit": units.pop() if len(units) == 1 else "px",
        "histories": histories,
        "panels": panels,
        "class_names": class_names,
    }


def write_results(out_dir: str | os.PathLike, evaluation: Mapping[str, Any], title: str = "") -> dict[str, Any]:
    """Write metrics.json, summary.md, curves.png and overlays.png; returns the JSON-able results."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "algo": evaluation["algo"],
        "sites": {s: {k: v for k, v in m.items() if k != "cases"} for s, m in evaluation["sites"].items()},
        "mean": evaluation["mean"],
        "distance_unit": evaluation["distance_unit"],
        "class_names": list(evaluation.get("class_names", [])),
        "cases": {s: m.get("cases", {}) for s, m in evaluation["sites"].items()},
    }
    results["note"] = (
        "Each site's personalized checkpoint (best validation Dice) on its own test split; threshold 0.5, "
        f"metrics per patient in 3-D, HD95/ASSD in {results['distance_unit']}; mean = unweighted mean over sites"
        + (" and, per class, the mean over classes." if len(results["class_names"]) > 1 else ".")
    )
    write_metrics(out_dir, results, title=title or f"{results['algo']}: test metrics per site")
    plot_curves(out_dir / "curves.png", evaluation["histories"], title=title or str(results["algo"]))
    if evaluation["panels"]:
        plot_overlays(out_dir / "overlays.png", evaluation["panels"], evaluation["class_names"], title=title)
    return results


def print_table(results: Mapping[str, Any]) -> None:
    print(results_table(results), flush=True)
