"""Importers: the paper's real data layouts -> the on-disk convention of :mod:`lcfed.runtime.data.layout`.

Supported layouts (the paper's data sets and NVFlare's prostate example):

- ``prostate``: the 6-site prostate MRI release (``RUNMC/Case00.nii.gz`` + ``Case00_segmentation.nii.gz``);
- ``fundus``: the DoFE/FedDG optic disc/cup release (``Domain1/{train,test}/ROIs/{image,mask}/*.png``);
- ``polyp``: the PraNet split (``TestDataset/{Kvasir,CVC-ClinicDB,CVC-ColonDB,ETIS-LaribPolypDB}/{images,masks}``
  and ``TrainDataset/{images,masks}``, whose Kvasir and CVC-ClinicDB images are told apart by file name);
- ``nvflare-prostate``: NVFlare's prostate example (``dataset/<client>/{Image,Mask}`` + per-client datalists).

Volumes are written as 2-D axial NIfTI slices, photographs as RGB PNG; label maps hold integer codes.
Every importer builds into a temporary folder next to ``out`` and renames it into place at the end, so
a failed import never leaves partial output over a good one. Every input problem raises
:class:`~lcfed.runtime.data.layout.DataError` naming the site, the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from lcfed.runtime.data.layout import (
    SPLITS,
    DataError,
    DatasetInfo,
    save_image,
    split_by_patient,
    write_datalist,
    write_dataset_info,
)

__all__ = [
    "KINDS",
    "FRACTIONS",
    "PROSTATE_SITES",
    "FUNDUS_SITES",
    "POLYP_SITES",
    "import_dataset",
    "import_prostate",
    "import_fundus",
    "import_polyp",
    "import_nvflare_prostate",
    "normalize_slice",
    "VOLUME_KINDS",
]

KINDS = ("prostate", "fundus", "polyp", "nvflare-prostate")
# kinds whose importer cuts volumes into slices normalised by normalize_slice (prediction on raw volumes repeats it)
VOLUME_KINDS = ("prostate", "nvflare-prostate")
# LC-Fed splits 80/20 train/test by case; a validation split is carved out of the training part.
FRACTIONS = (0.7, 0.1, 0.2)

PROSTATE_SITES = ("RUNMC", "BMC", "I2CVB", "UCL", "BIDMC", "HK")
FUNDUS_SITES = {"Domain1": "drishti-gs", "Domain2": "rim-one-r3", "Domain3": "refuge-train", "Domain4": "refuge-val"}
POLYP_SITES = {
    "Kvasir": "kvasir",
    "ETIS-LaribPolypDB": "etis",
    "CVC-ColonDB": "cvc-colondb",
    "CVC-ClinicDB": "cvc-clinicdb",
}

PHOTO_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
NIFTI_EXTS = (".nii.gz", ".nii")
# Fundus mask grey levels -> label codes (0 background, 1 disc rim, 2 cup).
FUNDUS_LEVELS = {0: 2, 128: 1, 255: 0}
# Lossy re-encoding moves mask grey levels a little; anything farther than this is not a fundus mask.
FUNDUS_TOLERANCE = 32

Entry = dict[str, Any]


@dataclass
class _Case:
    """One patient: an image file, its label file and, when the source fixes it, its split."""

    case_id: str
    image: Path
    label: Path
    split: str | None = None


@dataclass
class _Site:
    name: str
    source: Path
    cases: list[_Case]
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Written:
    """What writing one site produced."""

    entries: dict[str, list[Entry]]  # case id -> slice entries (empty: nothing usable in the case)
    spacing: list[float] | None = None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def import_dataset(
    kind: str,
    src: str | os.PathLike,
    out: str | os.PathLike,
    size: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> DatasetInfo:
    """Convert a real data set at ``src`` into the on-disk convention at ``out``.

    Args:
        kind: one of :data:`KINDS` ("prostate", "fundus", "polyp", "nvflare-prostate").
        src: root folder of the downloaded data set.
        out: output folder; must be missing or empty unless ``overwrite`` is true.
        size: resize every image/label to ``size`` x ``size`` (bilinear / nearest); None keeps the native size.
        seed: seed of the patient-level split.
        overwrite: replace a non-empty ``out`` (only once the new data set is complete).

    Returns:
        The written :class:`DatasetInfo`.

    Raises:
        ValueError: unknown ``kind``.
        DataError: anything wrong with the input (or a non-empty ``out`` without ``overwrite``).
    """
    importers: dict[str, Callable[..., DatasetInfo]] = {
        "prostate": import_prostate,
        "fundus": import_fundus,
        "polyp": import_polyp,
        "nvflare-prostate": import_nvflare_prostate,
    }
    if kind not in importers:
        raise ValueError(f"unknown data set kind {kind!r}; expected one of {', '.join(KINDS)}")
    return importers[kind](src, out, size=size, seed=seed, overwrite=overwrite)


def import_prostate(
    src: str | os.PathLike, out: str | os.PathLike, size: int | None = None, seed: int = 0, overwrite: bool = False
) -> DatasetInfo:
    """Import the 6-site prostate MRI release (site folders RUNMC, BMC, I2CVB, UCL, BIDMC, HK).

    Each ``CaseNN.nii.gz`` is paired with ``CaseNN_segmentation.nii.gz`` (any case). Axial slices
    (last axis) that contain prostate are written as per-slice normalized float32 NIfTI images and
    uint8 label maps (1 = prostate, from any value > 0); cases are split (0.7, 0.1, 0.2) by patient.
    """
    src, out = _check_paths(src, out, overwrite)
    sites = [_prostate_site(name, folder) for name, folder in _find_prostate_sites(src)]
    info = DatasetInfo(
        name="prostate-6site",
        sites=[s.name for s in sites],
        channels=1,
        labels={"prostate": [1]},
        largest_component=True,
        description="Multi-site prostate T2 MRI (RUNMC, BMC, I2CVB, UCL, BIDMC, HK): axial slices with prostate, "
        "normalized per slice (clip at the 99th percentile, scale to [0, 1]).",
    )
    return _build(info, "prostate", src, out, sites, _volume_writer(size), size, seed, overwrite)


def import_fundus(
    src: str | os.PathLike, out: str | os.PathLike, size: int | None = None, seed: int = 0, overwrite: bool = False
) -> DatasetInfo:
    """Import the DoFE/FedDG fundus release (``Domain{1..4}/{train,test}/ROIs/{image,mask}/*.png``).

    Mask grey levels 0 (cup), 128 (disc rim), 255 (background) -- nearest level, so slightly lossy
    masks are accepted -- become codes 2, 1, 0. The train and test parts of a domain are pooled and
    split (0.7, 0.1, 0.2) by image (one image = one patient).
    """
    src, out = _check_paths(src, out, overwrite)
    sites = [_fundus_site(name, folder) for name, folder in _find_named_sites(src, FUNDUS_SITES, _FUNDUS_EXPECTED)]
    info = DatasetInfo(
        name="fundus-4site",
        sites=[s.name for s in sites],
        channels=3,
        labels={"disc": [1, 2], "cup": [2]},
        largest_component=True,
        description="Optic disc/cup ROIs (DoFE/FedDG release): Drishti-GS, RIM-ONE-r3, REFUGE train, REFUGE val. "
        "Label codes: 1 disc rim, 2 cup; disc = rim or cup.",
    )
    return _build(info, "fundus", src, out, sites, _photo_writer(size, _fundus_codes), size, seed, overwrite)


def import_polyp(
    src: str | os.PathLike, out: str | os.PathLike, size: int | None = None, seed: int = 0, overwrite: bool = False
) -> DatasetInfo:
    """Import the PraNet polyp split as LC-Fed's four sites, Kvasir and CVC-ClinicDB whole.

    Sites Kvasir, ETIS-LaribPolypDB, CVC-ColonDB, CVC-ClinicDB (those present); CVC-300 is not used.
    ``src`` may be the PraNet root or its ``TestDataset`` folder (a ``TrainDataset`` beside it is then
    used too). Mask > 0 is polyp (code 1); one image = one case.

    PraNet's ``TestDataset/{Kvasir,CVC-ClinicDB}`` hold only 100 and 62 images; the other 900 and 550 of
    those sites (the paper's 1,000 and 612) are mixed in ``TrainDataset/{images,masks}``. They are given
    back to their site by file name, the two releases' own naming: an all-digit stem (``1.png`` ..
    ``612.png``, the CVC-ClinicDB frame number) is CVC-ClinicDB; a stem of 20 or more lowercase letters
    and digits, at least one a letter (``cju0qkwl35piu0993l0dewei2.png``, a Kvasir-SEG image id) is
    Kvasir; any other name is an error naming the file. Their case ids get the prefix ``train_`` (the two
    folders may reuse a name), and they are pooled with the site's test images before the split (0.7,
    0.1, 0.2), so the split is over the whole site.
    """
    src, out = _check_paths(src, out, overwrite)
    root = src / "TestDataset" if (src / "TestDataset").is_dir() else src
    train_root = _polyp_train_root(src)
    pooled = _polyp_train_cases(train_root) if train_root is not None else {}
    if pooled and not any(_subdir(root, key) for key in POLYP_SITES):
        found = []  # TrainDataset alone: its two sites only
    else:
        found = _find_named_sites(root, POLYP_SITES, _POLYP_EXPECTED, hint=_polyp_hint(src))
    folders = dict(found)
    sites = []
    for name in POLYP_SITES.values():
        if name not in folders and name not in pooled:
            continue
        site = _polyp_site(name, folders[name]) if name in folders else _Site(name, train_root, [])
        if name in pooled:
            site.cases += pooled[name]
            site.extra["pranet_train_images"] = len(pooled[name])
        site.extra["pranet_test_images"] = len(site.cases) - len(pooled.get(name, []))
        sites.append(site)
    info = DatasetInfo(
        name="polyp-4site",
        sites=[s.name for s in sites],
        channels=3,
        labels={"polyp": [1]},
        largest_component=False,
        description="Colonoscopy polyps (PraNet split): Kvasir, ETIS-LaribPolypDB, CVC-ColonDB, CVC-ClinicDB; "
        "Kvasir and CVC-ClinicDB pool their TestDataset images with theirs from TrainDataset.",
    )
    return _build(info, "polyp", src, out, sites, _photo_writer(size, _polyp_codes), size, seed, overwrite)


def import_nvflare_prostate(
    src: str | os.PathLike, out: str | os.PathLike, size: int | None = None, seed: int = 0, overwrite: bool = False
) -> DatasetInfo:
    """Import NVFlare's prostate example (``dataset/<client>/{Image,Mask}/*.nii.gz``).

    ``src`` is the folder holding ``dataset/`` or ``dataset/`` itself. Each client's case-level
    training/validation/testing split is taken from its datalist JSON (``datalist/<client>.json``,
    ``datalist/client_<client>.json`` or a JSON of that name next to the data); without one the
    client's volumes are split (0.7, 0.1, 0.2) by case. Slices are written as for :func:`import_prostate`.
    """
    src, out = _check_paths(src, out, overwrite)
    data_dir = src / "dataset" if (src / "dataset").is_dir() else src
    sites = [_nvflare_site(client, folder, data_dir) for client, folder in _find_nvflare_clients(data_dir)]
    info = DatasetInfo(
        name="nvflare-prostate",
        sites=[s.name for s in sites],
        channels=1,
        labels={"prostate": [1]},
        largest_component=True,
        description="NVFlare prostate example clients: axial slices with prostate, normalized per slice "
        "(clip at the 99th percentile, scale to [0, 1]); case-level splits from the clients' datalists.",
    )
    return _build(info, "nvflare-prostate", src, out, sites, _volume_writer(size), size, seed, overwrite)


# ---------------------------------------------------------------------------------------------
# Building the output
# ---------------------------------------------------------------------------------------------

Writer = Callable[[_Site, Path], _Written]


def _build(
    info: DatasetInfo,
    kind: str,
    src: Path,
    out: Path,
    sites: list[_Site],
    writer: Writer,
    size: int | None,
    seed: int,
    overwrite: bool,
) -> DatasetInfo:
    counts: dict[str, Any] = {}
    with _staging(out, overwrite) as tmp:
        for site in sites:
            site_dir = tmp / site.name
            written = writer(site, site_dir)
            splits = _assign_splits(site, written.entries, seed)
            write_datalist(site_dir, site.name, splits, spacing=written.spacing)
            counts[site.name] = _site_counts(site, written, splits)
        info.extra = {"kind": kind, "src": str(src), "size": size, "seed": seed, "sites": counts}
        if any(c.split is None for s in sites for c in s.cases):
            info.extra["fractions"] = list(FRACTIONS)
        write_dataset_info(tmp, info)
    return info


def _assign_splits(site: _Site, entries: dict[str, list[Entry]], seed: int) -> dict[str, list[Entry]]:
    """Split the usable cases by patient: the source's split where it fixes one, else :func:`split_by_patient`."""
    usable = [c for c in site.cases if entries.get(c.case_id)]
    if not usable:
        raise DataError("no usable case (no image with a non-empty label)", site=site.name, file=site.source)
    split_of = {c.case_id: c.split for c in usable if c.split is not None}
    free = [c.case_id for c in usable if c.split is None]
    if free:
        for split, ids in split_by_patient(free, FRACTIONS, seed).items():
            split_of.update(dict.fromkeys(ids, split))
    splits: dict[str, list[Entry]] = {s: [] for s in SPLITS}
    for case_id in sorted(split_of):
        splits[split_of[case_id]].extend(entries[case_id])
    if not splits["training"]:
        raise DataError("no training case left (after dropping cases without label)", site=site.name, file=site.source)
    return splits


def _site_counts(site: _Site, written: _Written, splits: dict[str, list[Entry]]) -> dict[str, Any]:
    counts: dict[str, Any] = {
        "source": str(site.source),
        "cases": sum(1 for c in site.cases if written.entries.get(c.case_id)),
        "images": sum(len(v) for v in splits.values()),
    }
    for split, entries in splits.items():
        counts[split] = {"cases": len({e["case_id"] for e in entries}), "images": len(entries)}
    dropped = sorted(c.case_id for c in site.cases if not written.entries.get(c.case_id))
    if dropped:
        counts["dropped_cases"] = dropped
    counts.update(site.extra)
    return counts


def _check_paths(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    src, out = Path(src).absolute(), Path(out).absolute()
    if not src.is_dir():
        raise DataError("source folder not found" if not src.exists() else "source is not a folder", file=src)
    if out.exists() and not out.is_dir():
        raise DataError("output path exists and is not a folder", file=out)
    if src == out or out in src.parents:
        # overwrite would delete the source data
        raise DataError(f"output folder must not contain the source folder {src}", file=out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError("output folder is not empty; pass overwrite=True to replace it", file=out)
    return src, out


@contextmanager
def _staging(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh folder next to ``out``; on success move it to ``out``, on failure delete it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.importing-", dir=out.parent))
    try:
        yield tmp
        _move_into_place(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    backup = None
    if out.exists():
        if any(out.iterdir()) and not overwrite:  # filled by someone else while we were importing
            raise DataError("output folder is not empty; pass overwrite=True to replace it", file=out)
        backup = out.with_name(f".{out.name}.replaced-{uuid.uuid4().hex[:8]}")
        out.rename(backup)
    try:
        tmp.rename(out)
    except BaseException:
        if backup is not None:
            backup.rename(out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Finding sites and cases
# ---------------------------------------------------------------------------------------------

_FUNDUS_EXPECTED = "Domain1..Domain4 folders, each with train/ROIs/{image,mask} and/or test/ROIs/{image,mask} (DoFE)"
_POLYP_EXPECTED = (
    "TestDataset/{Kvasir,ETIS-LaribPolypDB,CVC-ColonDB,CVC-ClinicDB}/{images,masks} (PraNet split); "
    "src may be the PraNet root or its TestDataset folder"
)


def _listing(folder: Path, limit: int = 12) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    if not names:
        return "nothing"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _subdir(folder: Path | None, name: str) -> Path | None:
    """The sub-folder of ``folder`` called ``name``, compared case-insensitively."""
    if folder is None or not folder.is_dir():
        return None
    matches = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.lower() == name.lower())
    return matches[0] if matches else None


def _find_named_sites(root: Path, names: dict[str, str], expected: str, hint: str = "") -> list[tuple[str, Path]]:
    """(output site name, folder) for each known site folder present in ``root``, in canonical order."""
    found = [(site, folder) for key, site in names.items() if (folder := _subdir(root, key)) is not None]
    if not found:
        raise DataError(f"no recognised site folder: expected {expected}; found {_listing(root)}{hint}", file=root)
    return found


def _find_prostate_sites(src: Path) -> list[tuple[str, Path]]:
    expected = (
        f"one or more of the site folders {', '.join(PROSTATE_SITES)}, "
        "each holding CaseNN.nii.gz + CaseNN_segmentation.nii.gz"
    )
    return _find_named_sites(src, {s: s.lower() for s in PROSTATE_SITES}, expected)


def _polyp_hint(src: Path) -> str:
    if (src / "TrainDataset").is_dir() and not (src / "TestDataset").is_dir():
        return " (TrainDataset holds no image of a known site)"
    return ""


# PraNet's TrainDataset mixes two releases; their file names tell them apart (see import_polyp)
_CLINICDB_NAME = re.compile(r"^\d+$")
_KVASIR_NAME = re.compile(r"^(?=[a-z0-9]*[a-z])[a-z0-9]{20,}$")


def _polyp_train_root(src: Path) -> Path | None:
    """PraNet's ``TrainDataset`` under ``src`` or, when ``src`` is the ``TestDataset`` folder, beside it."""
    for candidate in (src, src.parent) if src.name.lower() == "testdataset" else (src,):
        found = _subdir(candidate, "TrainDataset")
        if found is not None:
            return found
    return None


def _polyp_train_cases(train_root: Path) -> dict[str, list[_Case]]:
    """TrainDataset's images per site (``kvasir``, ``cvc-clinicdb``), attributed by file name."""
    image_dir = _subdir(train_root, "images") or _subdir(train_root, "image")
    mask_dir = _subdir(train_root, "masks") or _subdir(train_root, "mask")
    if image_dir is None or mask_dir is None:
        raise DataError(f"expected images/ and masks/ folders; found {_listing(train_root)}", file=train_root)
    images = _files_by_stem(image_dir, _photo_stem, "TrainDataset")
    masks = _files_by_stem(mask_dir, _photo_stem, "TrainDataset")
    pairs = _pair(images, masks, "TrainDataset", f"{mask_dir}/{{stem}}.png", f"{image_dir}/{{stem}}.png")
    out: dict[str, list[_Case]] = {}
    for stem, image, mask in pairs:
        if _CLINICDB_NAME.match(stem):
            site = POLYP_SITES["CVC-ClinicDB"]
        elif _KVASIR_NAME.match(stem):
            site = POLYP_SITES["Kvasir"]
        else:
            raise DataError(
                "cannot tell which site this TrainDataset image belongs to: CVC-ClinicDB images are numbered "
                "(1.png), Kvasir images are 20+ character lowercase ids (cju0qkwl35piu0993l0dewei2.png)",
                site="TrainDataset",
                file=image,
            )
        out.setdefault(site, []).append(_Case(f"train_{stem}", image, mask))
    return out


def _nifti_stem(path: Path) -> str | None:
    """File name without its NIfTI extension, or None for anything that is not a NIfTI file."""
    lower = path.name.lower()
    for ext in NIFTI_EXTS:
        if lower.endswith(ext):
            return path.name[: -len(ext)]
    return None


def _photo_stem(path: Path) -> str | None:
    return path.stem if path.suffix.lower() in PHOTO_EXTS else None


def _files_by_stem(folder: Path, stem_of: Callable[[Path], str | None], site: str) -> dict[str, Path]:
    """Map case stem -> file for the image files of ``folder`` (hidden and other files are skipped)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = stem_of(path)
        if path.name.startswith(".") or not path.is_file() or stem is None:
            continue
        if stem in files:
            raise DataError(f"two files for case {stem!r} (also {files[stem].name})", site=site, file=path)
        files[stem] = path
    return files


def _pair(
    images: dict[str, Path], masks: dict[str, Path], site: str, mask_hint: str, image_hint: str
) -> list[tuple[str, Path, Path]]:
    """Pair images and masks by case stem; raise on any image without its mask or vice versa."""
    for stem, path in images.items():
        if stem not in masks:
            raise DataError(f"image has no mask (expected {mask_hint.format(stem=stem)})", site=site, file=path)
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"mask has no image (expected {image_hint.format(stem=stem)})", site=site, file=path)
    return [(stem, images[stem], masks[stem]) for stem in sorted(images)]


def _prostate_site(name: str, folder: Path) -> _Site:
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    for stem, path in _files_by_stem(folder, _nifti_stem, name).items():
        if stem.lower().endswith("_segmentation"):
            masks[stem[: -len("_segmentation")]] = path
        else:
            images[stem] = path
    if not images and not masks:
        raise DataError("no CaseNN.nii.gz volumes found", site=name, file=folder)
    pairs = _pair(images, masks, name, "{stem}_segmentation.nii.gz", "{stem}.nii.gz")
    return _Site(name, folder, [_Case(stem, img, msk) for stem, img, msk in pairs])


def _roi_parts(site: str, domain: Path) -> list[tuple[str, Path, Path]]:
    """(part, image folder, mask folder) for the train/test parts of a fundus domain."""
    parts = []
    for part in ("train", "test"):
        rois = _subdir(_subdir(domain, part), "ROIs")
        if rois is None:
            continue
        image_dir, mask_dir = _subdir(rois, "image"), _subdir(rois, "mask")
        if image_dir is None or mask_dir is None:
            missing = "image" if image_dir is None else "mask"
            raise DataError(f"folder {missing}/ missing next to {_listing(rois)}", site=site, file=rois)
        parts.append((part, image_dir, mask_dir))
    if not parts:
        raise DataError(
            f"expected train/ROIs/{{image,mask}} and/or test/ROIs/{{image,mask}}; found {_listing(domain)}",
            site=site,
            file=domain,
        )
    return parts


def _fundus_site(name: str, domain: Path) -> _Site:
    cases = []
    for part, image_dir, mask_dir in _roi_parts(name, domain):
        images = _files_by_stem(image_dir, _photo_stem, name)
        masks = _files_by_stem(mask_dir, _photo_stem, name)
        pairs = _pair(images, masks, name, f"{mask_dir}/{{stem}}.png", f"{image_dir}/{{stem}}.png")
        # the train and test parts may reuse file names
        cases += [_Case(f"{part}_{stem}", img, msk) for stem, img, msk in pairs]
    if not cases:
        raise DataError(f"no images found (expected {', '.join(PHOTO_EXTS)} files)", site=name, file=domain)
    return _Site(name, domain, cases)


def _polyp_site(name: str, folder: Path) -> _Site:
    image_dir, mask_dir = _subdir(folder, "images"), _subdir(folder, "masks")
    if image_dir is None or mask_dir is None:
        raise DataError(f"expected images/ and masks/ folders; found {_listing(folder)}", site=name, file=folder)
    images = _files_by_stem(image_dir, _photo_stem, name)
    masks = _files_by_stem(mask_dir, _photo_stem, name)
    if not images and not masks:
        raise DataError(f"no images found (expected {', '.join(PHOTO_EXTS)} files)", site=name, file=image_dir)
    pairs = _pair(images, masks, name, f"{mask_dir}/{{stem}}.png", f"{image_dir}/{{stem}}.png")
    return _Site(name, folder, [_Case(stem, img, msk) for stem, img, msk in pairs])


def _find_nvflare_clients(data_dir: Path) -> list[tuple[str, Path]]:
    clients = sorted(p for p in data_dir.iterdir() if p.is_dir() and _subdir(p, "Image") is not None)
    if not clients:
        raise DataError(
            "no client folder: expected dataset/<client>/{Image,Mask}/*.nii.gz (NVFlare prostate example), "
            f"src being the folder holding dataset/ or dataset/ itself; found {_listing(data_dir)}",
            file=data_dir,
        )
    return [(p.name, p) for p in clients]


def _nvflare_site(client: str, folder: Path, data_dir: Path) -> _Site:
    name = client.lower()
    image_dir, mask_dir = _subdir(folder, "Image"), _subdir(folder, "Mask")
    if mask_dir is None:
        raise DataError(f"expected Image/ and Mask/ folders; found {_listing(folder)}", site=name, file=folder)
    if any(p.is_dir() for p in image_dir.iterdir()):
        raise DataError(
            "expected NIfTI volumes but found case sub-folders (the 2-D slice layout is not supported; "
            "use the 3-D dataset/ folder)",
            site=name,
            file=image_dir,
        )
    images = _files_by_stem(image_dir, _nifti_stem, name)
    masks = _files_by_stem(mask_dir, _nifti_stem, name)
    if not images and not masks:
        raise DataError("no NIfTI volumes found", site=name, file=image_dir)
    pairs = _pair(images, masks, name, f"{mask_dir}/{{stem}}.nii.gz", f"{image_dir}/{{stem}}.nii.gz")
    datalist = _find_client_datalist(client, data_dir)
    if datalist is None:
        return _Site(name, folder, [_Case(stem, img, msk) for stem, img, msk in pairs], {"datalist": None})
    cases = _cases_from_datalist(name, datalist, data_dir)
    unlisted = sorted({stem for stem, _, _ in pairs} - {c.case_id for c in cases})
    extra: dict[str, Any] = {"datalist": str(datalist)}
    if unlisted:
        extra["unlisted_cases"] = unlisted
    return _Site(name, folder, cases, extra)


def _find_client_datalist(client: str, data_dir: Path) -> Path | None:
    """The client's datalist JSON: ``<client>.json`` or ``client_<client>.json`` in the usual places."""
    wanted = {client.lower(), f"client_{client.lower()}"}
    root = data_dir.parent
    for folder in (root / "datalist", data_dir / "datalist", root, data_dir, data_dir / client):
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.json")):
            if path.stem.lower() in wanted:
                return path
    return None


def _cases_from_datalist(site: str, path: Path, data_dir: Path) -> list[_Case]:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"malformed datalist JSON: {e}", site=site, file=path) from None
    if not isinstance(raw, dict) or not any(isinstance(raw.get(s), list) for s in SPLITS):
        raise DataError(f"expected a JSON object with lists {', '.join(SPLITS)}", site=site, file=path)
    cases: dict[str, _Case] = {}
    for split in SPLITS:
        for i, entry in enumerate(raw.get(split) or []):
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise DataError(f"{split}[{i}] needs 'image' and 'label'", site=site, file=path)
            image = _resolve(entry["image"], data_dir, site, path, f"{split}[{i}] image")
            label = _resolve(entry["label"], data_dir, site, path, f"{split}[{i}] label")
            case_id = _nifti_stem(image) or image.name
            if case_id in cases:
                raise DataError(
                    f"case {case_id!r} listed twice ({cases[case_id].split}, {split})", site=site, file=path
                )
            cases[case_id] = _Case(case_id, image, label, split)
    return list(cases.values())


def _resolve(rel: Any, data_dir: Path, site: str, datalist: Path, what: str) -> Path:
    """Datalist paths are relative to the data root (``dataset/``); accept its parent and absolute paths too."""
    p = Path(str(rel))
    candidates = [p] if p.is_absolute() else [data_dir / p, data_dir.parent / p, datalist.parent / p]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"{what} {rel!r} not found under {data_dir}", site=site, file=datalist)


# ---------------------------------------------------------------------------------------------
# Reading, converting and writing images
# ---------------------------------------------------------------------------------------------


def _read_volume(path: Path, site: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 3-D NIfTI volume as float32 and its voxel spacing."""
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as e:  # nibabel raises many types for truncated / non-NIfTI files
        raise DataError(f"not a readable NIfTI file ({type(e).__name__}: {e})", site=site, file=path) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"expected a 3-D volume, got shape {data.shape}", site=site, file=path)
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return data, (zooms[0], zooms[1], zooms[2])


def _read_photo(path: Path, site: str, mode: str) -> np.ndarray:
    """A 2-D image converted to PIL ``mode`` ("RGB" or "L")."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert(mode))
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise DataError(f"not a readable image file ({type(e).__name__}: {e})", site=site, file=path) from None


def _check_shapes(image: np.ndarray, label: np.ndarray, case: _Case, site: str) -> None:
    # a photo is (H, W, 3) against an (H, W) mask; a volume is (X, Y, Z) against (X, Y, Z)
    if image.shape[: label.ndim] != label.shape:
        raise DataError(
            f"image shape {image.shape} and mask shape {label.shape} differ (image {case.image.name})",
            site=site,
            file=case.label,
        )


def normalize_slice(x: np.ndarray) -> np.ndarray:
    """Clip at the 99th percentile and scale to [0, 1] (float32); a flat slice becomes zeros."""
    lo, hi = float(x.min()), float(np.percentile(x, 99))
    if hi <= lo:
        return np.zeros(x.shape, np.float32)
    return ((np.clip(x, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _resize(array: np.ndarray, size: int | None, is_label: bool) -> np.ndarray:
    """Resize a (H, W) or (H, W, 3) array to ``size`` x ``size`` (nearest for labels, bilinear otherwise)."""
    if size is None or array.shape[:2] == (size, size):
        return array
    resample = Image.Resampling.NEAREST if is_label else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(array)).resize((size, size), resample))


def _volume_writer(size: int | None) -> Writer:
    """Writer for NIfTI volume pairs: one NIfTI slice per axial slice that holds label."""

    def write(site: _Site, site_dir: Path) -> _Written:
        entries: dict[str, list[Entry]] = {}
        spacings = []
        for case in site.cases:
            entries[case.case_id], spacing = _write_volume_case(site.name, case, site_dir, size)
            if entries[case.case_id]:
                spacings.append(spacing)
        spacing = [float(s) for s in np.median(spacings, axis=0)] if spacings else None
        return _Written(entries, spacing)

    return write


def _write_volume_case(site: str, case: _Case, site_dir: Path, size: int | None) -> tuple[list[Entry], list[float]]:
    image, spacing = _read_volume(case.image, site)
    label, _ = _read_volume(case.label, site)
    _check_shapes(image, label, case, site)
    sx, sy, sz = spacing
    if size is not None:
        sx, sy = sx * image.shape[0] / size, sy * image.shape[1] / size
    entries = []
    for z in range(image.shape[2]):
        mask = label[:, :, z] > 0
        if not mask.any():
            continue
        img = _resize(normalize_slice(image[:, :, z]), size, is_label=False)
        lab = _resize(mask.astype(np.uint8), size, is_label=True)
        name = f"{case.case_id}_{z:03d}.nii.gz"
        save_image(site_dir / "images" / name, img, spacing=(sx, sy))
        save_image(site_dir / "labels" / name, lab, spacing=(sx, sy))
        entries.append(_entry(name, case.case_id, z, spacing=[sx, sy, sz]))
    return entries, [sx, sy, sz]


def _photo_writer(size: int | None, to_codes: Callable[[np.ndarray, _Case, str], np.ndarray]) -> Writer:
    """Writer for 2-D photographs: RGB PNG image + uint8 PNG label map (codes from ``to_codes``)."""

    def write(site: _Site, site_dir: Path) -> _Written:
        entries: dict[str, list[Entry]] = {}
        for case in site.cases:
            image = _read_photo(case.image, site.name, "RGB")
            mask = _read_photo(case.label, site.name, "L")
            _check_shapes(image, mask, case, site.name)
            codes = to_codes(mask, case, site.name)
            name = f"{case.case_id}.png"
            save_image(site_dir / "images" / name, _resize(image, size, is_label=False))
            save_image(site_dir / "labels" / name, _resize(codes, size, is_label=True))
            entries[case.case_id] = [_entry(name, case.case_id, 0)]
        return _Written(entries)

    return write


def _entry(name: str, case_id: str, index: int, spacing: Sequence[float] | None = None) -> Entry:
    entry: Entry = {"image": f"images/{name}", "label": f"labels/{name}", "case_id": case_id, "slice": index}
    if spacing is not None:
        entry["spacing"] = [float(s) for s in spacing]
    return entry


def _fundus_codes(mask: np.ndarray, case: _Case, site: str) -> np.ndarray:
    """Grey levels 0 / 128 / 255 (nearest, within :data:`FUNDUS_TOLERANCE`) -> codes 2 (cup) / 1 (rim) / 0."""
    levels = np.array(list(FUNDUS_LEVELS), dtype=np.int16)
    dist = np.abs(mask.astype(np.int16)[..., None] - levels)
    far = dist.min(axis=-1) > FUNDUS_TOLERANCE
    if far.any():
        bad = np.unique(mask[far])
        shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if len(bad) > 8 else "")
        raise DataError(
            f"mask values {shown} are not near 0 (cup), 128 (disc rim) or 255 (background)", site=site, file=case.label
        )
    codes = np.array(list(FUNDUS_LEVELS.values()), dtype=np.uint8)
    return codes[dist.argmin(axis=-1)]


def _polyp_codes(mask: np.ndarray, case: _Case, site: str) -> np.ndarray:
    """Mask > 0 -> code 1 (polyp)."""
    return (mask > 0).astype(np.uint8)
