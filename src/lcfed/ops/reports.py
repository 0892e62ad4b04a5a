"""Results a person looks at: metrics.json, a markdown table, learning curves, prediction overlays."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lcfed.runtime.data.layout import write_json_atomic
from lcfed.runtime.metrics import METRIC_NAMES

__all__ = ["write_metrics", "results_table", "plot_curves", "plot_overlays", "format_table", "per_class_table"]


def _fmt(value: float, name: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if name in ("dice", "iou") else f"{value:.2f}"


def format_table(
    sites: Mapping[str, Mapping[str, Any]],
    mean: Mapping[str, Any],
    distance_unit: str = "px",
    class_names: Sequence[str] = (),
) -> str:
    """Markdown table: one row per site and the unweighted mean over sites.

    With more than one class and per-class values (``per_class``, from :func:`lcfed.runtime.metrics.
    evaluate_site`), a second table gives each class's Dice, IoU, HD95 and ASSD per site and over sites,
    beside the mean over classes of the first.
    """
    head = ["site", "cases", "Dice", "IoU", f"HD95 ({distance_unit})", f"ASSD ({distance_unit})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, m in sites.items():
        cells = [site, str(m.get("n_cases", ""))] + [_fmt(m[n], n) for n in METRIC_NAMES]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["**mean over sites**", ""] + [f"**{_fmt(mean[n], n)}**" for n in METRIC_NAMES]
    lines.append("| " + " | ".join(cells) + " |")
    per_class = per_class_table(sites, mean, distance_unit, class_names)
    if per_class:
        lines += ["", per_class]
    return "\n".join(lines)


def per_class_table(
    sites: Mapping[str, Mapping[str, Any]],
    mean: Mapping[str, Any],
    distance_unit: str = "px",
    class_names: Sequence[str] = (),
) -> str:
    """Per class and site: Dice, IoU, HD95, ASSD (markdown); "" with one class or no per-class values."""
    rows = [(site, m.get("per_class")) for site, m in sites.items()] + [("**mean over sites**", mean.get("per_class"))]
    if any(not pc for _, pc in rows):
        return ""
    n_cls = len(rows[0][1]["dice"])
    if n_cls < 2:
        return ""
    names = list(class_names) if len(class_names) == n_cls else [f"class {c}" for c in range(n_cls)]
    head = ["site", "class", "Dice", "IoU", f"HD95 ({distance_unit})", f"ASSD ({distance_unit})"]
    lines = ["Per class:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for site, pc in rows:
        for c, name in enumerate(names):
            cells = [site, name] + [_fmt(pc[n][c], n) if n in pc else "n/a" for n in METRIC_NAMES]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def results_table(results: Mapping[str, Any]) -> str:
    unit = results.get("distance_unit", "px")
    return format_table(results["sites"], results["mean"], unit, results.get("class_names", ()))


def write_metrics(out_dir: str | os.PathLike, results: Mapping[str, Any], title: str = "") -> None:
    """``metrics.json`` and ``summary.md``.

    ``metrics.json``: ``{"algo", "sites": {SITE: {dice, iou, hd95, assd, per_class, n_cases}}, "mean",
    "class_names"}``, ``per_class`` being ``{metric: [one value per class]}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "metrics.json", results)
    lines = [f"# {title or results.get('algo', 'results')}", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    lines += [results_table(results), ""]
    (out_dir / "summary.md").write_text("\n".join(lines))


def plot_curves(
    out_file: str | os.PathLike, histories: Mapping[str, Sequence[Mapping[str, Any]]], title: str = ""
) -> None:
    """Validation Dice per site per round (and the mean over sites)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    per_round: dict[int, list[float]] = {}
    for site, hist in histories.items():
        validated = [h for h in hist if "val_dice" in h]
        rounds = [h["round"] + 1 for h in validated]
        dice = [h["val_dice"] for h in validated]
        axes[0].plot(rounds, dice, marker="o", ms=3, label=site)
        trained = [h for h in hist if "dice_loss" in h]
        axes[1].plot([h["round"] + 1 for h in trained], [h["dice_loss"] for h in trained], label=site)
        for r, d in zip(rounds, dice):
            per_round.setdefault(r, []).append(d)
    if per_round:
        rs = sorted(per_round)
        axes[0].plot(rs, [np.mean(per_round[r]) for r in rs], "k--", lw=2, label="mean")
    axes[0].set(xlabel="round", ylabel="validation Dice", title="validation Dice of the evaluated model")
    axes[1].set(xlabel="round", ylabel="training soft-Dice loss", title="training loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out_file, dpi=110)
    plt.close(fig)


def _show_image(ax, image: np.ndarray) -> None:
    if image.shape[0] == 3:
        img = np.moveaxis(image, 0, -1)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
        ax.imshow(img)
    else:
        ax.imshow(image[0], cmap="gray")


def _contours(ax, mask: np.ndarray, colors: Sequence[str]) -> None:
    for c in range(mask.shape[0]):
        if mask[c].any():
            ax.contour(mask[c].astype(float), levels=[0.5], colors=[colors[c % len(colors)]], linewidths=1.0)


def plot_overlays(
    out_file: str | os.PathLike,
    panels: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    title: str = "",
) -> None:
    """One row per panel: image, ground truth, prediction, disagreement map (with the picked peaks).

    Each panel: ``{"site", "case", "image" (C,H,W), "label" (K,H,W), "prediction" (K,H,W) probabilities,
    "disagreement" (K,H,W) or None, "peaks" (K,H,W) or None, "dice": float}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = ["#ffd000", "#00e5ff", "#ff4fd8", "#7CFC00"]
    n = len(panels)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3 * n), squeeze=False)
    for row, p in enumerate(panels):
        ax = axes[row]
        _show_image(ax[0], p["image"])
        ax[0].set_title(f"{p['site']} / {p['case']}", fontsize=9)
        _show_image(ax[1], p["image"])
        _contours(ax[1], p["label"] > 0.5, colors)
        ax[1].set_title("ground truth", fontsize=9)
        _show_image(ax[2], p["image"])
        _contours(ax[2], p["prediction"] >= 0.5, colors)
        source = "HC output S*" if p.get("calibrated") else "prediction"
        ax[2].set_title(f"{source} (Dice {p.get('dice', float('nan')):.3f})", fontsize=9)
        dis = p.get("disagreement")
        if dis is not None:
            im = ax[3].imshow(dis.max(axis=0), cmap="magma", vmin=0, vmax=1)
            peaks = p.get("peaks")
            if peaks is not None:
                ys, xs = np.nonzero(peaks.max(axis=0))
                ax[3].scatter(xs, ys, s=14, facecolors="none", edgecolors="cyan", linewidths=1.0)
            fig.colorbar(im, ax=ax[3], fraction=0.046)
            ax[3].set_title("head disagreement U~ (o = peaks)", fontsize=9)
        else:
            ax[3].text(0.5, 0.5, "no head bank\n(algorithm without HC)", ha="center", va="center")
        for a in ax:
            a.set_xticks([])
            a.set_yticks([])
    handles = [plt.Line2D([0], [0], color=colors[i % len(colors)], lw=2) for i in range(len(class_names))]
    fig.legend(handles, list(class_names), loc="lower center", ncol=len(class_names), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    fig.savefig(out_file, dpi=100)
    plt.close(fig)
