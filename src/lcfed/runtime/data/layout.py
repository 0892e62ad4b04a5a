"""The on-disk convention every data set uses (demo and importers alike).

::

    DIR/
      dataset.json          name, ordered site list, image channels, label channels, options
      <site>/
        datalist.json       MONAI decathlon-style: training / validation / testing lists
        images/...          2-D slices: NIfTI (.nii.gz, grayscale) or PNG (RGB)
        labels/...          label maps with integer codes (same file type and shape as the image)

Each datalist entry is ``{"image": rel_path, "label": rel_path, "case_id": str, "slice": int}``.
``case_id`` names the patient: splits are by patient, never by slice, and per-patient metrics
regroup the slices of a case in ``slice`` order. ``dataset.json["labels"]`` maps each output
(sigmoid) channel to the label codes it covers, e.g. ``{"disc": [1, 2], "cup": [2]}`` for fundus
(overlapping labels), so one label map serves multi-label tasks.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATASET_FILE",
    "DATALIST_FILE",
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "split_by_patient",
    "write_json_atomic",
    "write_dataset_info",
    "load_dataset_info",
    "write_datalist",
    "load_datalist",
    "save_image",
]

DATASET_FILE = "dataset.json"
DATALIST_FILE = "datalist.json"
SPLITS = ("training", "validation", "testing")


class DataError(ValueError):
    """Bad input data. The message names the site, the file and what is wrong."""

    def __init__(self, what: str, site: str | None = None, file: str | os.PathLike | None = None):
        self.what = what
        self.site = site
        self.file = str(file) if file is not None else None
        where = []
        if site is not None:
            where.append(f"site {site!r}")
        if file is not None:
            where.append(f"file {self.file}")
        super().__init__(f"[{', '.join(where)}] {what}" if where else what)


@dataclass
class DatasetInfo:
    """Contents of ``dataset.json``.

    Args:
        name: data set name.
        sites: ordered site names (one FLARE client per site; the order fixes the one-hot index).
        channels: image channels (1 grayscale, 3 RGB).
        labels: output channel name -> label codes that belong to it.
        largest_component: keep the largest connected component per class at evaluation.
        description: free text (e.g. per-site shifts, source, licence notice file).
        extra: anything else worth keeping (generator parameters, importer source).
    """

    name: str
    sites: list[str]
    channels: int
    labels: dict[str, list[int]]
    largest_component: bool = False
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> list[int]:
        """Codes allowed in a label map: 0 (background) and every code named in ``labels``."""
        return sorted({0, *(v for codes in self.labels.values() for v in codes)})

    def validate(self, file: str | os.PathLike | None = None) -> None:
        if not self.sites:
            raise DataError("no sites listed", file=file)
        dupes = sorted({s for s in self.sites if self.sites.count(s) > 1})
        if dupes:
            raise DataError(f"site(s) listed twice: {dupes}", file=file)
        for s in self.sites:
            if not s or "/" in s or s.startswith(".") or s != s.strip():
                raise DataError(f"invalid site name {s!r}", file=file)
        if self.channels not in (1, 3):
            raise DataError(f"channels must be 1 or 3, got {self.channels}", file=file)
        if not self.labels:
            raise DataError("no label channels declared", file=file)
        for name, codes in self.labels.items():
            if not codes or any((not isinstance(c, int)) or c <= 0 for c in codes):
                raise DataError(f"label channel {name!r} needs positive integer codes, got {codes}", file=file)


def split_by_patient(
    case_ids: Iterable[str], fractions: Sequence[float] = (0.6, 0.2, 0.2), seed: int = 0
) -> dict[str, list[str]]:
    """Split unique patient ids into training / validation / testing, deterministically.

    Every split gets at least one patient when there are three or more.
    """
    cases = sorted(set(case_ids))
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    rng = np.random.default_rng(seed)
    order = [cases[i] for i in rng.permutation(len(cases))]
    n = len(order)
    total = sum(fractions)
    n_val = int(round(n * fractions[1] / total))
    n_test = int(round(n * fractions[2] / total))
    if n >= 3:
        n_val = max(n_val, 1 if fractions[1] > 0 else 0)
        n_test = max(n_test, 1 if fractions[2] > 0 else 0)
    n_train = max(n - n_val - n_test, 0)
    return {
        "training": sorted(order[:n_train]),
        "validation": sorted(order[n_train : n_train + n_val]),
        "testing": sorted(order[n_train + n_val :]),
    }


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_dataset_info(out_dir: str | os.PathLike, info: DatasetInfo) -> Path:
    info.validate()
    path = Path(out_dir) / DATASET_FILE
    write_json_atomic(path, asdict(info))
    return path


def _read_json(path: Path, site: str | None) -> Any:
    if not path.is_file():
        raise DataError("file not found", site=site, file=path)
    try:
        with open(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e}", site=site, file=path) from None
    except UnicodeDecodeError:
        raise DataError("not a text (JSON) file", site=site, file=path) from None


def load_dataset_info(data_dir: str | os.PathLike) -> DatasetInfo:
    """Read and validate ``DIR/dataset.json``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError("data folder not found", file=data_dir)
    path = data_dir / DATASET_FILE
    raw = _read_json(path, None)
    if not isinstance(raw, dict):
        raise DataError("expected a JSON object", file=path)
    missing = [k for k in ("name", "sites", "channels", "labels") if k not in raw]
    if missing:
        raise DataError(f"missing field(s) {missing}", file=path)
    try:
        info = DatasetInfo(**raw)
    except TypeError as e:
        raise DataError(f"unexpected field: {e}", file=path) from None
    info.validate(path)
    return info


def write_datalist(
    site_dir: str | os.PathLike,
    site: str,
    splits: dict[str, list[dict[str, Any]]],
    spacing: Sequence[float] | None = None,
) -> Path:
    """Write ``<site_dir>/datalist.json``; entries hold paths relative to ``site_dir``."""
    body: dict[str, Any] = {"site": site}
    if spacing is not None:
        body["spacing"] = [float(s) for s in spacing]
    for split in SPLITS:
        body[split] = list(splits.get(split, []))
    path = Path(site_dir) / DATALIST_FILE
    write_json_atomic(path, body)
    return path


def load_datalist(
    site_dir: str | os.PathLike,
    site: str,
    require_files: bool = True,
    file: str | os.PathLike | None = None,
    for_training: bool = True,
) -> dict[str, Any]:
    """Read and validate a site's datalist. Returns the JSON with absolute ``image``/``label`` paths.

    Args:
        site_dir: the site's folder; relative paths in the datalist start there.
        site: the site's name, for messages.
        require_files: every image and label file must exist.
        file: the datalist if not ``site_dir/datalist.json``.
        for_training: a training datalist needs training entries and a label per entry; prediction
            reads images only.

    Raises :class:`DataError` naming the site and the file for a missing folder, a missing, empty or
    malformed datalist, an entry without image/label/case_id, a missing image or label file, or a
    patient that appears in two splits.
    """
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise DataError("site data folder not found", site=site, file=site_dir)
    path = Path(file) if file is not None else site_dir / DATALIST_FILE
    raw = _read_json(path, site)
    if not isinstance(raw, dict):
        raise DataError("expected a JSON object with training/validation/testing lists", site=site, file=path)
    out: dict[str, Any] = {"site": raw.get("site", site), "spacing": raw.get("spacing")}
    case_split: dict[str, str] = {}
    total = 0
    for split in SPLITS:
        entries = raw.get(split, [])
        if not isinstance(entries, list):
            raise DataError(f"{split!r} must be a list", site=site, file=path)
        resolved = []
        for i, e in enumerate(entries):
            keys = ("image", "label") if for_training else ("image",)
            if not isinstance(e, dict) or any(k not in e for k in keys):
                raise DataError(f"{split}[{i}] needs {' and '.join(repr(k) for k in keys)}", site=site, file=path)
            case = str(e.get("case_id", Path(str(e["image"])).name))
            prev = case_split.setdefault(case, split)
            if prev != split:
                raise DataError(f"patient {case!r} is in both {prev!r} and {split!r}", site=site, file=path)
            item = dict(e)
            item["case_id"] = case
            item["slice"] = int(e.get("slice", 0))
            for key in (k for k in ("image", "label") if k in e):
                p = Path(str(e[key]))
                p = p if p.is_absolute() else site_dir / p
                if require_files and not p.is_file():
                    raise DataError(f"{split}[{i}] {key} file not found", site=site, file=p)
                item[key] = str(p)
            resolved.append(item)
        out[split] = resolved
        total += len(resolved)
    if for_training and (total == 0 or not out["training"]):
        raise DataError("datalist has no training entries", site=site, file=path)
    return out


def save_image(path: str | os.PathLike, array: np.ndarray, spacing: Sequence[float] | None = None) -> None:
    """Save a 2-D slice: ``.nii.gz``/``.nii`` via nibabel (H, W), ``.png`` via Pillow (H, W) or (H, W, 3)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.lower()
    if name.endswith((".nii.gz", ".nii")):
        import nibabel as nib

        affine = np.eye(4)
        if spacing is not None:
            affine[0, 0], affine[1, 1] = float(spacing[0]), float(spacing[1])
        nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    elif name.endswith(".png"):
        from PIL import Image

        Image.fromarray(np.asarray(array)).save(path)
    else:
        raise ValueError(f"unsupported image file type: {path}")
