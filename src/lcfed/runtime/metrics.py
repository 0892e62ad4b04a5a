"""Segmentation evaluation as reported in the LC-Fed paper.

Pipeline (:func:`evaluate_site`):

1. threshold the per-class probabilities at 0.5 (:func:`binarize`, ``prob >= threshold`` is foreground);
2. regroup the 2-D slices of each patient into one 3-D volume ``(C, H, W, S)`` (:func:`regroup_cases`);
3. optionally keep the largest connected component of every class on that volume (:func:`largest_component`);
4. per case, Dice, IoU, HD95 and ASSD per class, then the mean over classes (:func:`case_metrics`);
5. per site the mean over cases; across sites the unweighted mean over sites (:func:`mean_over_sites`).

Classes are independent binary channels (multi-label, they may overlap, e.g. optic disc and cup), so
every metric is computed on each channel on its own; there is no background channel.

The metric values themselves come from MONAI (``compute_dice``, ``compute_iou``,
``compute_hausdorff_distance(percentile=95)``, ``compute_average_surface_distance(symmetric=True)``),
and the largest connected component from ``get_largest_connected_component_mask``.
MONAI returns NaN/inf when a mask is empty; this module never passes it an empty mask and applies
explicit conventions instead (see :func:`case_metrics`), so no metric is ever NaN.

Units: HD95 and ASSD are in the units of ``spacing`` (pixels/voxels when no spacing is given).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
)
from monai.transforms.utils import get_largest_connected_component_mask

__all__ = [
    "METRIC_NAMES",
    "binarize",
    "largest_component",
    "regroup_cases",
    "case_metrics",
    "evaluate_site",
    "mean_over_sites",
    "mean_per_class",
]

METRIC_NAMES = ("dice", "iou", "hd95", "assd")


def binarize(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Threshold probabilities into a boolean mask.

    A value counts as foreground when ``prob >= threshold`` (so a probability of exactly 0.5 is
    foreground at the default threshold). Shape is preserved.
    """
    return np.asarray(prob) >= threshold


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest connected component of every channel, independently.

    Args:
        mask: ``(C, *spatial)`` boolean (or 0/1) array; the ``C`` channels are independent binary
            classes that may overlap.

    Returns:
        Boolean array of the same shape. Each channel keeps only its largest connected component,
        computed with full connectivity over the spatial axes (8-connectivity in 2-D,
        26-connectivity in 3-D, MONAI's default). An empty channel stays empty. Channels do not
        interact: overlap between channels is irrelevant. Ties between equally large components
        are broken by MONAI (one of them is kept).
    """
    mask = np.asarray(mask).astype(bool, copy=False)
    if mask.ndim < 2:
        raise ValueError(f"mask must be (C, *spatial), got shape {mask.shape}")
    out = np.zeros_like(mask, dtype=bool)
    for c in range(mask.shape[0]):
        if mask[c].any():
            out[c] = np.asarray(get_largest_connected_component_mask(mask[c], connectivity=None), dtype=bool)
    return out


def regroup_cases(
    case_ids: Sequence[str],
    slices: Sequence[int],
    preds: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Regroup per-slice 2-D arrays into one 3-D volume per case (patient).

    Args:
        case_ids: case (patient) id of each slice (used as ``str(case_id)``).
        slices: index of each slice within its case; only the order matters (gaps are allowed).
        preds, labels: ``(C, H, W)`` arrays, one per slice.

    Returns:
        ``{case_id: (pred, label)}`` with ``pred`` and ``label`` of shape ``(C, H, W, S)``: the slices
        of the case sorted by slice index and stacked along a new last axis. A case with a single
        slice becomes ``(C, H, W, 1)``. Cases appear in the order of their first slice in the input;
        dtypes are kept.

    Raises:
        ValueError: if the four sequences differ in length, a pred and its label differ in shape, a
            slice is not 3-D, the slices of one case differ in shape, or a ``(case, slice)`` pair
            appears twice.
    """
    n = len(case_ids)
    if not (len(slices) == len(preds) == len(labels) == n):
        raise ValueError(
            f"case_ids, slices, preds and labels must have the same length, got "
            f"{n}, {len(slices)}, {len(preds)}, {len(labels)}"
        )
    grouped: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    for cid, idx, p, lab in zip(case_ids, slices, preds, labels):
        p, lab = np.asarray(p), np.asarray(lab)
        if p.shape != lab.shape:
            raise ValueError(f"case {cid!r} slice {idx}: pred shape {p.shape} != label shape {lab.shape}")
        if p.ndim != 3:
            raise ValueError(f"case {cid!r} slice {idx}: expected a (C, H, W) slice, got shape {p.shape}")
        entries = grouped.setdefault(str(cid), [])
        if entries and entries[0][1].shape != p.shape:
            raise ValueError(f"case {cid!r}: slice {idx} has shape {p.shape}, other slices {entries[0][1].shape}")
        entries.append((int(idx), p, lab))
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for cid, entries in grouped.items():
        entries.sort(key=lambda e: e[0])
        order = [e[0] for e in entries]
        if len(set(order)) != len(order):
            dup = sorted({i for i in order if order.count(i) > 1})
            raise ValueError(f"case {cid!r}: duplicated slice index {dup}")
        out[cid] = (np.stack([e[1] for e in entries], axis=-1), np.stack([e[2] for e in entries], axis=-1))
    return out


def _resolve_spacing(spacing: Sequence[float] | None, ndim: int) -> list[float]:
    if spacing is None:
        return [1.0] * ndim
    sp = [float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float))]
    if len(sp) == 1:
        sp = sp * ndim
    if len(sp) != ndim:
        raise ValueError(f"spacing must have one value per spatial axis ({ndim}), got {len(sp)}")
    if any(not (s > 0 and math.isfinite(s)) for s in sp):
        raise ValueError(f"spacing must be positive and finite, got {sp}")
    return sp


def case_metrics(
    pred: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float] | None = None,
    surface: bool = True,
) -> dict[str, Any]:
    """Dice, IoU, HD95 and ASSD of one case, per class and averaged over classes.

    Args:
        pred, label: boolean (or 0/1) arrays ``(C, *spatial)`` with 2 or 3 spatial axes; each channel
            is an independent binary class.
        spacing: physical size of a pixel/voxel along each spatial axis (a single number means
            isotropic). Default: 1 along every axis, i.e. distances in pixels.
        surface: compute HD95 and ASSD (the slow part); without them only dice and iou are returned
            (per-round validation needs Dice only).

    Returns:
        ``{"dice", "iou", "hd95", "assd"}``: the unweighted means over classes (python floats), plus
        ``"per_class": {"dice": [...], "iou": [...], "hd95": [...], "assd": [...]}``.

    Conventions:
        - HD95 is MONAI's symmetric 95th-percentile Hausdorff distance (the larger of the two
          directed 95th percentiles of surface-to-surface distances); ASSD is the mean of all
          surface distances in both directions. Both are Euclidean, in the units of ``spacing``.
          Surfaces are MONAI's: mask minus its binary erosion.
        - Spatial axes of length 1 (e.g. a case made of a single slice, ``(C, H, W, 1)``) are
          dropped before the surface distances, so a single slice is measured on its 2-D contour
          (rather than treating the whole one-voxel-thick slab as surface).
        - Both pred and label of a class empty: dice = iou = 1, hd95 = assd = 0.
        - Exactly one of them empty: dice = iou = 0, hd95 = assd = the diagonal of the whole array
          in physical units, ``sqrt(sum((n_i * spacing_i) ** 2))`` over the spatial axes -- larger
          than any attainable distance, so a missed or spurious class is penalised and never NaN.
    """
    pred = np.asarray(pred).astype(bool, copy=False)
    label = np.asarray(label).astype(bool, copy=False)
    if pred.shape != label.shape:
        raise ValueError(f"pred shape {pred.shape} != label shape {label.shape}")
    if pred.ndim not in (3, 4):
        raise ValueError(f"expected (C, *spatial) with 2 or 3 spatial axes, got shape {pred.shape}")
    n_cls, spatial = pred.shape[0], pred.shape[1:]
    sp = _resolve_spacing(spacing, len(spatial))
    diagonal = float(math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial, sp))))

    p_any = pred.reshape(n_cls, -1).any(axis=1)
    l_any = label.reshape(n_cls, -1).any(axis=1)
    both = p_any & l_any
    one = p_any ^ l_any

    dice = np.ones(n_cls)
    iou = np.ones(n_cls)
    hd95 = np.zeros(n_cls)
    assd = np.zeros(n_cls)
    dice[one] = iou[one] = 0.0
    hd95[one] = assd[one] = diagonal

    idx = np.flatnonzero(both)
    if idx.size:
        # One conversion per case: (1, k, *spatial) float tensors of the classes present in both.
        yp = torch.from_numpy(np.ascontiguousarray(pred[idx][None])).float()
        yt = torch.from_numpy(np.ascontiguousarray(label[idx][None])).float()
        dice[idx] = compute_dice(yp, yt, include_background=True)[0].numpy()
        iou[idx] = compute_iou(yp, yt, include_background=True)[0].numpy()

        keep = [ax for ax, n in enumerate(spatial) if n > 1]
        if not surface:
            pass
        elif not keep:  # a single voxel present in both masks: identical surfaces
            hd95[idx] = assd[idx] = 0.0
        else:
            drop = tuple(2 + ax for ax, n in enumerate(spatial) if n == 1)
            yp_s, yt_s = (yp.squeeze(drop), yt.squeeze(drop)) if drop else (yp, yt)
            sp_s = [sp[ax] for ax in keep]
            with warnings.catch_warnings():
                # MONAI 1.5/1.6 passes its own deprecated `always_return_as_numpy` argument internally.
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                hd95[idx] = compute_hausdorff_distance(
                    yp_s, yt_s, include_background=True, percentile=95, spacing=sp_s
                )[0].numpy()
                assd[idx] = compute_average_surface_distance(
                    yp_s, yt_s, include_background=True, symmetric=True, spacing=sp_s
                )[0].numpy()

    per_class = {"dice": dice, "iou": iou, "hd95": hd95, "assd": assd}
    names = METRIC_NAMES if surface else ("dice", "iou")
    result: dict[str, Any] = {name: float(np.mean(per_class[name])) for name in names}
    result["per_class"] = {name: [float(v) for v in per_class[name]] for name in names}
    return result


def evaluate_site(
    case_ids: Sequence[str],
    slices: Sequence[int],
    probs: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    largest_cc: bool,
    spacing: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    threshold: float = 0.5,
    surface: bool = True,
) -> dict[str, Any]:
    """Evaluate one site's validation/test slices per case (patient), as in the LC-Fed paper.

    Args:
        case_ids, slices: case id and slice index of every slice.
        probs: per-slice ``(C, H, W)`` foreground probabilities (after sigmoid).
        labels: per-slice ``(C, H, W)`` binary labels (values ``>= 0.5`` count as foreground, so
            0/1, bool and 0/255 all work).
        largest_cc: keep only the largest connected component of each class on the 3-D case volume.
        spacing: ``(sy, sx, sz)`` physical spacing of the regrouped ``(H, W, S)`` volume (a single
            number means isotropic), or a mapping case id -> spacing when cases differ (e.g. stored at
            different sizes, then resized to one working size); default 1, i.e. HD95/ASSD in pixels.
        threshold: foreground when ``prob >= threshold``.
        surface: also compute HD95 and ASSD (otherwise only dice and iou).

    Returns:
        ``{"cases": {case_id: {"dice", "iou", "hd95", "assd", "per_class"}}, "dice", "iou", "hd95", "assd",
        "per_class", "n_cases"}`` where the site values are the unweighted means over cases of the per-case
        values (each itself a mean over classes; see :func:`case_metrics` for empty-mask conventions) and
        ``per_class`` maps each metric to one value per class (channel order), also the mean over cases.

    Raises:
        ValueError: on no slices or inconsistent inputs (see :func:`regroup_cases`).
    """
    if len(case_ids) == 0:
        raise ValueError("evaluate_site needs at least one slice")
    preds = [binarize(p, threshold) for p in probs]
    labs = [binarize(lab, 0.5) for lab in labels]
    cases: dict[str, dict[str, float]] = {}
    for cid, (pred, label) in regroup_cases(case_ids, slices, preds, labs).items():
        if largest_cc:
            pred = largest_component(pred)
        case_spacing = spacing.get(cid) if isinstance(spacing, Mapping) else spacing
        m = case_metrics(pred, label, spacing=case_spacing, surface=surface)
        names = METRIC_NAMES if surface else ("dice", "iou")
        cases[cid] = {name: m[name] for name in names}
        cases[cid]["per_class"] = m["per_class"]
    result: dict[str, Any] = {"cases": cases}
    names = METRIC_NAMES if surface else ("dice", "iou")
    for name in names:
        result[name] = float(np.mean([c[name] for c in cases.values()]))
    result["per_class"] = {
        name: [float(v) for v in np.mean([c["per_class"][name] for c in cases.values()], axis=0)] for name in names
    }
    result["n_cases"] = len(cases)
    return result


def mean_over_sites(site_results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """Unweighted mean over sites of ``dice``, ``iou``, ``hd95`` and ``assd``.

    Every site counts once whatever its number of cases. ``site_results`` maps site name to a
    mapping holding at least the four metric names (e.g. the output of :func:`evaluate_site`).
    Returns the four means plus ``"n_sites"`` (an int), and ``"per_class"`` (each metric per class,
    averaged over sites) when every site has per-class values for the same number of classes. Raises
    ValueError on no sites or a site missing a metric.
    """
    if not site_results:
        raise ValueError("mean_over_sites needs at least one site")
    out: dict[str, float] = {}
    for name in METRIC_NAMES:
        values = []
        for site, res in site_results.items():
            if name not in res:
                raise ValueError(f"site {site!r} has no {name!r}")
            values.append(float(res[name]))
        out[name] = float(np.mean(values))
    out["n_sites"] = len(site_results)
    per_class = mean_per_class([res.get("per_class") for res in site_results.values()])
    if per_class is not None:
        out["per_class"] = per_class
    return out


def mean_per_class(items: Sequence[Mapping[str, Sequence[float]] | None]) -> dict[str, list[float]] | None:
    """Element-wise mean of several ``{metric: [one value per class]}`` mappings.

    None when any item is missing or the items disagree on the metrics or the number of classes (results
    written before per-class values existed, or of different data sets), so a caller never mixes classes.
    """
    present = [item for item in items if item]
    if not present or len(present) != len(items):
        return None
    names = [n for n in METRIC_NAMES if all(n in item for item in present)]
    if not names or len({len(item[n]) for item in present for n in names}) != 1:
        return None
    return {n: [float(v) for v in np.mean([item[n] for item in present], axis=0)] for n in names}
