"""The embedded multi-site demo set, built from the ICBM152 2009a template shipped in the nilearn wheel.

Real anatomy with real co-registered tissue maps, offline. Each site differs from the others the way
hospitals do:

- coverage and size: its own axial range and number of "subjects";
- annotation style: its own probability threshold on the tissue maps moves the boundaries (the
  ambiguous-boundary inconsistency LC-Fed's head calibration targets);
- scanner: a fixed, seeded appearance chain (gamma + Rician noise; low resolution + noise;
  bias field + Gibbs ringing; T2-like inverted contrast with a histogram shift).

A "subject" is one random elastic + affine deformation of the template, applied to a stack of
axial slices, so per-patient metrics regroup real 3-D cases. Two output channels overlap (like
fundus disc/cup): ``tissue`` (grey or white matter, codes 1 and 2) and ``wm`` (white matter, code 2).

Two regimes (``--regime``):

- ``rich`` (the default): 20/14/9/7 subjects, six labelled slices each, split 60/20/20 by patient. Every
  site has enough to learn its own model; what separates the methods is how they handle the sites'
  differences.
- ``scarce``: the same four sites with the same validation and test patients count (4/3/2/1 each, six
  slices per patient, so test numbers stay comparable with ``rich``), but every site is too small to learn
  alone. Fewer training patients alone does not make it: each subject is a deformed copy of one template,
  so a site learns the template from a single patient, while the site shifts punish any shared model
  (2/2/1/1 training patients gave Local above FedAvg). A first design with two labelled slices per
  training patient, stronger deformations and thresholds a third as far from 0.5 still left Local ahead,
  FedAvg losing most at the T2-like site, whose inverted contrast was two of twelve training slices. Five
  changes make the regime, each for a reason:

  1. fewer training patients, one per six of ``rich`` (2/2/1/1), a federation-sized site;
  2. sparse annotation: a training patient has ``SCARCE_TRAIN_SLICES`` (one) labelled slice at a random
     level of the site's range (clinicians often contour a few slices only), so a site alone sees one or
     two axial levels and must generalise to the others, which the other sites' slices cover;
  3. more anatomical variety between subjects: a per-patient elastic + affine deformation about twice as
     strong (larger magnitude, finer control grid, more rotation, anisotropic scaling), so one patient no
     longer stands for the population and the test patients differ from the training ones (at the
     extremes beyond real anatomy: a stretched brain may touch the border of the image);
  4. milder annotation shifts: each site's threshold moves a quarter as far from 0.5 as in ``rich``, so the
     label conventions still differ (LC-Fed's calibration has something to do) but pooling sites' data is
     worth more than it costs;
  5. no contrast inversion: the T2-like site keeps its histogram shift and noise (``histogram``) but not
     the inversion, which one labelled slice in a pool of six cannot teach a shared model.

  The other scanner chains are unchanged.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lcfed.runtime.data.layout import DatasetInfo, save_image, split_by_patient, write_datalist, write_dataset_info

__all__ = [
    "SiteSpec",
    "SitePlan",
    "DEFAULT_SITES",
    "REGIMES",
    "build_demo",
    "regime_plan",
    "icbm152_paths",
    "ICBM_NOTICE",
]

ICBM_NOTICE = """\
Derived from the MNI ICBM152 non-linear symmetric 2009a template (as shipped in the nilearn wheel).

Copyright (C) 1993-2004 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and its
documentation for any purpose and without fee is hereby granted, provided that the above copyright
notice appear in all copies. The authors and McGill University make no representations about the
suitability of this software for any purpose. It is provided "as is" without express or implied
warranty. The authors are not responsible for any data loss, equipment damage, property loss, or
injury to subjects or patients resulting from the use or misuse of this software package.

Please cite:
- V.S. Fonov, A.C. Evans, R.C. McKinstry, C.R. Almli, D.L. Collins. Unbiased nonlinear average
  age-appropriate brain templates from birth to adulthood. NeuroImage 47, S102 (2009).
- V.S. Fonov, A.C. Evans, K. Botteron, C.R. Almli, R.C. McKinstry, D.L. Collins and BDCG. Unbiased
  average age-appropriate atlases for pediatric studies. NeuroImage 54(1), 313-327 (2011).
- D.L. Collins, A.P. Zijdenbos, W.F.C. Baare, A.C. Evans. ANIMAL+INSECT: Improved Cortical Structure
  Segmentation. IPMI 1999.
"""


@dataclass(frozen=True)
class SiteSpec:
    """How one demo site differs from the others.

    Args:
        name: site (FLARE client) name.
        z_range: first and last axial slice (template voxel index) this site covers.
        subjects: number of subjects (patients).
        threshold: annotation style: tissue-probability threshold of this site's labels.
        scanner: appearance chain: "gamma-rician", "lowres", "bias-gibbs", "t2like" or "histogram" (t2like
            without the contrast inversion).
    """

    name: str
    z_range: tuple[int, int]
    subjects: int
    threshold: float
    scanner: str


DEFAULT_SITES: tuple[SiteSpec, ...] = (
    SiteSpec("site-a", (40, 120), 20, 0.50, "gamma-rician"),
    SiteSpec("site-b", (30, 105), 14, 0.35, "lowres"),
    SiteSpec("site-c", (55, 135), 9, 0.65, "bias-gibbs"),
    SiteSpec("site-d", (25, 100), 7, 0.45, "t2like"),
)
SCANNERS = ("gamma-rician", "lowres", "bias-gibbs", "t2like", "histogram")
SLICES_PER_SUBJECT = 6
EXTRA_SITE_NAMES = ("site-e", "site-f", "site-g", "site-h")
REGIMES = ("rich", "scarce")
# scarce regime (see the module docstring): training patients per rich training patient, labelled slices
# per training patient, how far a site's threshold moves from 0.5 relative to rich
SCARCE_TRAIN_PER_RICH = 1 / 6
SCARCE_TRAIN_SLICES = 1
SCARCE_THRESHOLD_SHIFT = 1 / 4
SCARCE_SCANNERS = {"t2like": "histogram"}


@dataclass(frozen=True)
class _Deformation:
    """Per-subject elastic + affine deformation (MONAI ``Rand2DElastic`` arguments, spacing as a fraction)."""

    grid: int  # control points per side: spacing = size // grid
    magnitude: tuple[float, float]
    rotate: float  # radians
    scale: tuple[float, float]  # relative, per axis (anisotropic when they differ)
    translate: float  # fraction of the image size


_DEFORMATIONS = {
    "rich": _Deformation(grid=4, magnitude=(1.0, 2.5), rotate=0.15, scale=(0.08, 0.08), translate=0.04),
    "scarce": _Deformation(grid=6, magnitude=(2.0, 5.0), rotate=0.3, scale=(0.2, 0.15), translate=0.06),
}


def icbm152_paths() -> dict[str, Path]:
    """Paths of the T1, GM and WM maps of the ICBM152 2009a template inside the installed nilearn."""
    try:
        import nilearn
    except ImportError as e:  # pragma: no cover - nilearn is a hard requirement
        raise RuntimeError("the demo set needs nilearn (pip install nilearn)") from e
    root = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = {k: root / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"nilearn {nilearn.__version__} does not ship the ICBM152 template files: {missing}")
    return paths


def _load_template() -> tuple[np.ndarray, tuple[slice, slice]]:
    """(3, X, Y, Z) float32 stack of T1, GM, WM in [0, 1], and the square in-plane crop around the brain."""
    import nibabel as nib

    vols = [np.asarray(nib.load(str(p)).dataobj, dtype=np.float32) / 255.0 for p in icbm152_paths().values()]
    stack = np.stack(vols)
    brain = stack[0] > 0
    xs = np.where(brain.any(axis=(1, 2)))[0]
    ys = np.where(brain.any(axis=(0, 2)))[0]
    side = max(xs[-1] - xs[0], ys[-1] - ys[0]) + 9
    crops = []
    for idx in (xs, ys):
        centre = (idx[0] + idx[-1]) // 2
        start = centre - side // 2
        crops.append(slice(start, start + side))
    # pad so the square crop is inside the array
    pad = max(0, -min(c.start for c in crops), max(crops[0].stop - stack.shape[1], crops[1].stop - stack.shape[2]))
    if pad:
        stack = np.pad(stack, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        crops = [slice(c.start + pad, c.stop + pad) for c in crops]
    return stack, (crops[0], crops[1])


class _Scanner:
    """A seeded appearance chain (MONAI intensity transforms) for one site."""

    def __init__(self, kind: str, seed: int):
        from monai.transforms import (
            GaussianSmooth,
            RandBiasField,
            RandGibbsNoise,
            RandHistogramShift,
            RandRicianNoise,
        )

        if kind not in SCANNERS:
            raise ValueError(f"unknown scanner {kind!r}; choose from {SCANNERS}")
        self.kind = kind
        if kind == "gamma-rician":
            self.steps = [RandRicianNoise(prob=1.0, mean=0.0, std=0.03)]
        elif kind == "lowres":
            self.steps = [GaussianSmooth(sigma=1.0), RandRicianNoise(prob=1.0, mean=0.0, std=0.06)]
        elif kind == "bias-gibbs":
            self.steps = [
                RandBiasField(degree=3, coeff_range=(0.3, 0.5), prob=1.0),
                RandGibbsNoise(prob=1.0, alpha=(0.45, 0.6)),
            ]
        else:
            self.steps = [RandHistogramShift(num_control_points=6, prob=1.0), RandRicianNoise(prob=1.0, std=0.02)]
        for i, t in enumerate(self.steps):
            if hasattr(t, "set_random_state"):
                t.set_random_state(seed + 7919 * i)

    def __call__(self, t1: np.ndarray, brain: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(t1[None])
        if self.kind == "gamma-rician":
            x = x.clamp_min(0) ** 0.8
        elif self.kind == "t2like":
            x = torch.where(torch.as_tensor(brain[None]), 1.0 - x, x)
        for t in self.steps:
            x = t(x)
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        out = x[0].numpy().astype(np.float32)
        # percentile renormalisation, per image (a saturating bias field needs it; harmless elsewhere)
        lo, hi = np.percentile(out, [1, 99])
        return np.clip((out - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


def _label_map(gm: np.ndarray, wm: np.ndarray, threshold: float) -> np.ndarray:
    """0 background, 1 grey matter, 2 white matter (channels: tissue = {1, 2}, wm = {2})."""
    lab = np.zeros(gm.shape, dtype=np.uint8)
    lab[(gm + wm) > threshold] = 1
    lab[wm > threshold] = 2
    return lab


def _site_specs(n_sites: int) -> list[SiteSpec]:
    if n_sites < 2:
        raise ValueError(f"the demo needs at least 2 sites, got {n_sites}")
    specs = list(DEFAULT_SITES[:n_sites])
    rng = np.random.default_rng(1234)
    for i in range(len(specs), n_sites):
        base = DEFAULT_SITES[i % len(DEFAULT_SITES)]
        lo = int(rng.integers(25, 60))
        specs.append(
            SiteSpec(
                EXTRA_SITE_NAMES[i - 4] if i - 4 < len(EXTRA_SITE_NAMES) else f"site-{i + 1}",
                (lo, lo + int(rng.integers(60, 90))),
                int(rng.integers(6, 16)),
                float(np.round(rng.uniform(0.35, 0.65), 2)),
                base.scanner,
            )
        )
    return specs


@dataclass(frozen=True)
class SitePlan:
    """One site of a regime: its spec, its patients per split and its labelled slices per training patient."""

    spec: SiteSpec
    n_train: int
    n_val: int
    n_test: int
    train_slices: int

    @property
    def subjects(self) -> int:
        return self.n_train + self.n_val + self.n_test


def regime_plan(n_sites: int = 4, regime: str = "rich") -> list[SitePlan]:
    """The sites of a regime (see the module docstring), with their patients per split.

    ``rich`` splits each site's subjects 60/20/20 by patient. ``scarce`` keeps rich's validation and test
    patients count, trains on one patient per six of rich's (at least one), labels ``SCARCE_TRAIN_SLICES``
    slice(s) per training patient, moves each threshold a quarter as far from 0.5 and drops the T2-like
    contrast inversion.
    """
    if regime not in REGIMES:
        raise ValueError(f"unknown regime {regime!r}; choose from {REGIMES}")
    plans = []
    for spec in _site_specs(n_sites):
        ids = [f"s{i}" for i in range(spec.subjects)]
        n_train, n_val, n_test = (len(v) for v in split_by_patient(ids).values())
        if regime == "rich":
            plans.append(SitePlan(spec, n_train, n_val, n_test, SLICES_PER_SUBJECT))
            continue
        # round() first: 12 * (1/6) is 2.0000000000000004 in floating point
        scarce_train = max(1, math.ceil(round(n_train * SCARCE_TRAIN_PER_RICH, 6)))
        threshold = round(0.5 + (spec.threshold - 0.5) * SCARCE_THRESHOLD_SHIFT, 3)
        scanner = SCARCE_SCANNERS.get(spec.scanner, spec.scanner)
        spec = replace(spec, subjects=scarce_train + n_val + n_test, threshold=threshold, scanner=scanner)
        plans.append(SitePlan(spec, scarce_train, n_val, n_test, SCARCE_TRAIN_SLICES))
    return plans


def build_demo(
    out: str | Path,
    n_sites: int = 4,
    size: int = 96,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
    regime: str = "rich",
) -> DatasetInfo:
    """Write the multi-site demo set to ``out`` (dataset.json, one folder per site, licence notice).

    Deterministic for a given (n_sites, size, seed, regime). Builds into a temporary folder beside ``out``
    and renames it into place, so an interrupted build never leaves a half-written data set.
    """
    from monai.transforms import Rand2DElastic, Resize

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    t0 = time.time()
    plans = regime_plan(n_sites, regime)
    specs = [p.spec for p in plans]
    deform = _DEFORMATIONS[regime]
    stack, (cx, cy) = _load_template()
    side = cx.stop - cx.start
    pixel_mm = side / size
    resize = Resize((size, size), mode="bilinear", anti_aliasing=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        site_info = {}
        for k, plan in enumerate(plans):
            spec = plan.spec
            site_seed = seed * 1000 + k
            rng = np.random.default_rng(site_seed)
            scanner = _Scanner(spec.scanner, site_seed)
            elastic = Rand2DElastic(
                spacing=(size // deform.grid, size // deform.grid),
                magnitude_range=deform.magnitude,
                prob=1.0,
                rotate_range=(deform.rotate,),
                scale_range=deform.scale,
                translate_range=(size * deform.translate, size * deform.translate),
                padding_mode="zeros",
            )
            elastic.set_random_state(site_seed)
            z0, z1 = spec.z_range
            z_step = (z1 - z0) / (SLICES_PER_SUBJECT - 1)
            names = [f"{spec.name}-s{s:02d}" for s in range(spec.subjects)]
            split = split_by_patient(
                names,
                fractions=(0.6, 0.2, 0.2) if regime == "rich" else (plan.n_train, plan.n_val, plan.n_test),
                seed=site_seed,
            )
            training = set(split["training"])
            # which slices of a training patient are labelled: its own generator, so the subjects' anatomy
            # does not depend on it
            label_rng = np.random.default_rng([seed, k, 1])
            cases: dict[str, list[dict]] = {}
            for case in names:
                jitter = float(rng.uniform(-z_step / 2, z_step / 2))
                zs = np.clip(
                    np.round(np.linspace(z0, z1, SLICES_PER_SUBJECT) + jitter).astype(int), 0, stack.shape[3] - 1
                )
                elastic.randomize((size, size))
                keep = set(range(SLICES_PER_SUBJECT))
                if case in training and plan.train_slices < SLICES_PER_SUBJECT:
                    keep = {int(j) for j in label_rng.choice(SLICES_PER_SUBJECT, plan.train_slices, replace=False)}
                entries = []
                for j, z in enumerate(zs):
                    if j not in keep:
                        continue
                    plane = torch.as_tensor(stack[:, cx, cy, z])
                    plane = resize(plane)
                    warped = elastic(plane, randomize=False)
                    warped = (warped.as_tensor() if hasattr(warped, "as_tensor") else warped).numpy()
                    t1, gm, wm = warped[0], warped[1], warped[2]
                    brain = (gm + wm) > 0.1
                    image = scanner(t1, brain)
                    label = _label_map(gm, wm, spec.threshold)
                    stem = f"{case}_{j:02d}"
                    save_image(tmp / spec.name / "images" / f"{stem}.nii.gz", image, (pixel_mm, pixel_mm))
                    save_image(tmp / spec.name / "labels" / f"{stem}.nii.gz", label, (pixel_mm, pixel_mm))
                    entries.append(
                        {
                            "image": f"images/{stem}.nii.gz",
                            "label": f"labels/{stem}.nii.gz",
                            "case_id": case,
                            "slice": j,
                        }
                    )
                cases[case] = entries
            write_datalist(
                tmp / spec.name,
                spec.name,
                {name: [e for c in ids for e in cases[c]] for name, ids in split.items()},
                spacing=(pixel_mm, pixel_mm, z_step),
            )
            site_info[spec.name] = {**asdict(spec), **{f"n_{n}": len(ids) for n, ids in split.items()}}
            if regime != "rich":
                site_info[spec.name]["train_slices_per_patient"] = plan.train_slices
            if verbose:
                slices = (
                    f"{SLICES_PER_SUBJECT} slices"
                    if plan.train_slices == SLICES_PER_SUBJECT
                    else f"{SLICES_PER_SUBJECT} slices ({plan.train_slices} labelled per training patient)"
                )
                print(
                    f"  {spec.name}: {spec.subjects} subjects x {slices}, z {z0}-{z1}, "
                    f"threshold {spec.threshold}, scanner {spec.scanner}; "
                    "patients train/val/test " + "/".join(str(len(ids)) for ids in split.values()),
                    flush=True,
                )
        extra: dict = {
            "generator": "lcfed.ops.data.demo",
            "seed": seed,
            "size": size,
            "pixel_mm": pixel_mm,
            "sites": site_info,
        }
        name, description = (
            "icbm152-demo",
            "Multi-site brain tissue segmentation built from the MNI ICBM152 2009a template "
            "(see LICENSE-ICBM152.txt). Channels: tissue (grey or white matter), wm (white matter).",
        )
        if regime != "rich":
            # the rich data set.json stays as it always was (byte-identical builds)
            extra["regime"] = regime
            name = f"{name}-{regime}"
            description += f" Regime {regime}: few training patients, few labelled slices each (lcfed.ops.data.demo)."
        info = DatasetInfo(
            name=name,
            sites=[s.name for s in specs],
            channels=1,
            labels={"tissue": [1, 2], "wm": [2]},
            largest_component=False,
            description=description,
            extra=extra,
        )
        write_dataset_info(tmp, info)
        (tmp / "LICENSE-ICBM152.txt").write_text(ICBM_NOTICE)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if verbose:
        print(f"demo set ({regime}) with {n_sites} sites written to {out} in {time.time() - t0:.1f} s", flush=True)
    return info
