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
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lcfed.runtime.data.layout import DatasetInfo, save_image, split_by_patient, write_datalist, write_dataset_info

__all__ = ["SiteSpec", "DEFAULT_SITES", "build_demo", "icbm152_paths", "ICBM_NOTICE"]

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
        scanner: appearance chain: "gamma-rician", "lowres", "bias-gibbs" or "t2like".
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
SCANNERS = ("gamma-rician", "lowres", "bias-gibbs", "t2like")
SLICES_PER_SUBJECT = 6
EXTRA_SITE_NAMES = ("site-e", "site-f", "site-g", "site-h")


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


def build_demo(
    out: str | Path,
    n_sites: int = 4,
    size: int = 96,
    seed: int = 0,
    overwrite: bool = False,
    verbose: bool = True,
) -> DatasetInfo:
    """Write the multi-site demo set to ``out`` (dataset.json, one folder per site, licence notice).

    Deterministic for a given (n_sites, size, seed). Builds into a temporary folder beside ``out`` and
    renames it into place, so an interrupted build never leaves a half-written data set.
    """
    from monai.transforms import Rand2DElastic, Resize

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite to replace it)")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    t0 = time.time()
    specs = _site_specs(n_sites)
    stack, (cx, cy) = _load_template()
    side = cx.stop - cx.start
    pixel_mm = side / size
    resize = Resize((size, size), mode="bilinear", anti_aliasing=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        site_info = {}
        for k, spec in enumerate(specs):
            site_seed = seed * 1000 + k
            rng = np.random.default_rng(site_seed)
            scanner = _Scanner(spec.scanner, site_seed)
            elastic = Rand2DElastic(
                spacing=(size // 4, size // 4),
                magnitude_range=(1.0, 2.5),
                prob=1.0,
                rotate_range=(0.15,),
                scale_range=(0.08, 0.08),
                translate_range=(size * 0.04, size * 0.04),
                padding_mode="zeros",
            )
            elastic.set_random_state(site_seed)
            z0, z1 = spec.z_range
            z_step = (z1 - z0) / (SLICES_PER_SUBJECT - 1)
            cases: dict[str, list[dict]] = {}
            for s in range(spec.subjects):
                case = f"{spec.name}-s{s:02d}"
                jitter = float(rng.uniform(-z_step / 2, z_step / 2))
                zs = np.clip(
                    np.round(np.linspace(z0, z1, SLICES_PER_SUBJECT) + jitter).astype(int), 0, stack.shape[3] - 1
                )
                elastic.randomize((size, size))
                entries = []
                for j, z in enumerate(zs):
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
            split = split_by_patient(cases, seed=site_seed)
            write_datalist(
                tmp / spec.name,
                spec.name,
                {name: [e for c in ids for e in cases[c]] for name, ids in split.items()},
                spacing=(pixel_mm, pixel_mm, z_step),
            )
            site_info[spec.name] = {**asdict(spec), **{f"n_{n}": len(ids) for n, ids in split.items()}}
            if verbose:
                print(
                    f"  {spec.name}: {spec.subjects} subjects x {SLICES_PER_SUBJECT} slices, z {z0}-{z1}, "
                    f"threshold {spec.threshold}, scanner {spec.scanner}; "
                    "patients train/val/test " + "/".join(str(len(ids)) for ids in split.values()),
                    flush=True,
                )
        info = DatasetInfo(
            name="icbm152-demo",
            sites=[s.name for s in specs],
            channels=1,
            labels={"tissue": [1, 2], "wm": [2]},
            largest_component=False,
            description=(
                "Multi-site brain tissue segmentation built from the MNI ICBM152 2009a template "
                "(see LICENSE-ICBM152.txt). Channels: tissue (grey or white matter), wm (white matter)."
            ),
            extra={
                "generator": "lcfed.ops.data.demo",
                "seed": seed,
                "size": size,
                "pixel_mm": pixel_mm,
                "sites": site_info,
            },
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
        print(f"demo set with {n_sites} sites written to {out} in {time.time() - t0:.1f} s", flush=True)
    return info
