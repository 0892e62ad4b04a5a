"""MONAI data pipeline: dictionary transforms and a cached data set per site and split.

Every image is validated as it is loaded (readable, channel count, image/label shapes, label codes,
finite values); any problem raises :class:`~lcfed.runtime.data.layout.DataError` naming the site and the file.
The cached samples are then stacked into tensors, so a training iteration only indexes memory.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Resized,
)

from .layout import SPLITS, DataError, DatasetInfo, load_datalist, load_dataset_info

__all__ = [
    "PHOTO_EXTENSIONS",
    "SplitData",
    "SiteData",
    "ValidatePaird",
    "LabelsToChannelsd",
    "to_channel_first",
    "image_reader",
    "image_transforms",
    "working_spacing",
    "site_transforms",
    "load_site",
]

# 2-D photographs read with Pillow (everything else is NIfTI); the importers write PNG, prediction also takes JPEG
PHOTO_EXTENSIONS = (".png", ".jpg", ".jpeg")


def to_channel_first(
    array: Any, is_label: bool = False, site: str | None = None, file: str | None = None
) -> torch.Tensor:
    """A 2-D slice as read -- (H, W), (H, W, 1) or an (H, W, 3|4) RGB(A) image -- as (channels, H, W).

    The alpha channel of an RGBA image is dropped. Raises :class:`DataError` naming the site and the
    file for any other shape (a label map must be (H, W) or (H, W, 1)).
    """
    x = torch.as_tensor(array)
    if x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim == 2:
        return x[None]
    if x.ndim == 3 and not is_label and x.shape[-1] in (3, 4):
        return x[..., :3].permute(2, 0, 1)
    what = "label map" if is_label else "image"
    raise DataError(f"expected a 2-D {what} slice, got array shape {tuple(x.shape)}", site, file)


class ValidatePaird(MapTransform):
    """Bring a freshly loaded (image, label) pair to channel-first and check it.

    Accepts 2-D slices: an image (H, W) or (H, W, 3|4) (RGB, alpha dropped) or with a singleton
    third axis (H, W, 1); a label map (H, W). Raises :class:`DataError` naming the site and the file
    for a wrong dimensionality or channel count, image/label shapes that differ, NaN/Inf voxels and
    label codes outside the declared set. Records the slice's stored (H, W) as ``stored_shape``.

    Args:
        site: site name for the message.
        channels: expected image channels.
        label_values: allowed label codes.
    """

    def __init__(self, site: str, channels: int, label_values: Sequence[int]):
        super().__init__(keys=["image", "label"])
        self.site = site
        self.channels = channels
        self.label_values = np.asarray(sorted(label_values))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img_file, lab_file = d.get("image_path", "?"), d.get("label_path", "?")
        image = to_channel_first(d["image"], False, self.site, img_file)
        label = to_channel_first(d["label"], True, self.site, lab_file)
        if image.shape[0] != self.channels:
            raise DataError(
                f"image has {image.shape[0]} channel(s), the data set declares {self.channels}", self.site, img_file
            )
        if tuple(image.shape[1:]) != tuple(label.shape[1:]):
            raise DataError(
                f"image shape {tuple(image.shape[1:])} differs from label shape {tuple(label.shape[1:])} "
                f"(label file {lab_file})",
                self.site,
                img_file,
            )
        image = image.to(torch.float32)
        if not torch.isfinite(image).all():
            raise DataError("image holds NaN or Inf values", self.site, img_file)
        lab = label.numpy()
        if not np.isfinite(lab).all():
            raise DataError("label map holds NaN or Inf values", self.site, lab_file)
        values = np.unique(lab)
        bad = values[~np.isin(values, self.label_values)]
        if bad.size:
            raise DataError(
                f"label values {[int(v) if float(v).is_integer() else float(v) for v in bad[:8]]} "
                f"outside the expected set {self.label_values.tolist()}",
                self.site,
                lab_file,
            )
        d["image"], d["label"] = image, label.to(torch.int64)
        # the stored size, before resizing to the working size: distances are rescaled by it (working_spacing)
        d["stored_shape"] = tuple(int(n) for n in image.shape[1:])
        return d


class LabelsToChannelsd(MapTransform):
    """Integer label map (1, H, W) -> one binary channel per output class, e.g. disc = {1, 2}, cup = {2}."""

    def __init__(self, keys: str, mapping: Sequence[Sequence[int]]):
        super().__init__(keys)
        self.mapping = [list(m) for m in mapping]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = torch.as_tensor(d[key])[0]
            d[key] = torch.stack([torch.isin(lab, torch.tensor(codes, dtype=lab.dtype)) for codes in self.mapping]).to(
                torch.float32
            )
        return d


class _RememberPaths(MapTransform):
    def __init__(self):
        super().__init__(keys=["image", "label"])

    def __call__(self, data):
        d = dict(data)
        d["image_path"], d["label_path"] = d["image"], d["label"]
        return d


def image_reader(path: str | os.PathLike) -> Any:
    """MONAI's reader for an image file: Pillow for PNG/JPEG, nibabel for everything else."""
    from monai.data import NibabelReader, PILReader

    if str(path).lower().endswith(PHOTO_EXTENSIONS):
        # keep (H, W) order for PNG so overlays are not transposed
        return PILReader(reverse_indexing=False)
    return NibabelReader()


def image_transforms(size: int, keys: str = "image") -> list[MapTransform]:
    """The intensity and size steps of every image slice, the same in training, evaluation and prediction.

    Per channel z-score over the slice, then bilinear resize to ``size x size``. Both work on a
    channel-first (channels, H, W) slice; the resize is invertible (MONAI's ``inverse``), which is how
    a prediction goes back to the slice's own size.
    """
    return [
        NormalizeIntensityd(keys=keys, channel_wise=True),
        Resized(keys=keys, spatial_size=(size, size), mode="bilinear", anti_aliasing=False),
    ]


def working_spacing(spacing: Sequence[float] | None, stored_shape: Sequence[int], size: int) -> tuple[float, ...]:
    """Physical (H, W, slice) spacing of a slice stored at ``stored_shape`` once it is resized to ``size x size``.

    A datalist's spacing is that of the stored images; resizing an H-pixel axis to ``size`` pixels
    multiplies its spacing by ``H / size``. Without a spacing the unit is the stored pixel (spacing 1);
    the slice axis (third value, default 1) is not resized.
    """
    base = [1.0, 1.0, 1.0] if not spacing else [float(v) for v in spacing]
    if len(base) == 1:
        base = base * 3
    if len(base) == 2:
        base.append(1.0)
    h, w = stored_shape
    return (base[0] * h / size, base[1] * w / size, base[2])


def site_transforms(site: str, info: DatasetInfo, size: int, example_path: str) -> Compose:
    """The list of steps that turns a datalist entry into a validated, normalised, resized sample."""
    return Compose(
        [
            _RememberPaths(),
            LoadImaged(keys=["image", "label"], reader=image_reader(example_path), image_only=True),
            ValidatePaird(site, info.channels, info.label_values),
            *image_transforms(size),
            Resized(keys="label", spatial_size=(size, size), mode="nearest"),
            LabelsToChannelsd(keys="label", mapping=list(info.labels.values())),
            EnsureTyped(keys=["image", "label"], dtype=torch.float32, track_meta=False),
        ]
    )


@dataclass
class SplitData:
    """One split of a site, stacked in memory."""

    images: torch.Tensor  # (N, channels, S, S)
    labels: torch.Tensor  # (N, classes, S, S) binary float
    case_ids: list[str]
    slices: list[int]
    # physical (H, W, slice) spacing of each slice at the working size S (see working_spacing)
    spacing: list[tuple[float, ...]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class SiteData:
    """All splits of one site."""

    site: str
    info: DatasetInfo
    splits: dict[str, SplitData] = field(default_factory=dict)
    spacing: list[float] | None = None  # the datalist's spacing of the stored images (None: pixels)

    @property
    def n_train(self) -> int:
        return len(self.splits["training"])


def _unwrap(err: BaseException) -> DataError | None:
    while err is not None:
        if isinstance(err, DataError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _load_split(entries: list[dict], transforms: Compose, site: str) -> list[dict]:
    from monai.data import CacheDataset

    if not entries:
        return []
    try:
        ds = CacheDataset(entries, transforms, cache_rate=1.0, num_workers=0, progress=False, copy_cache=False)
        return [ds[i] for i in range(len(ds))]
    except Exception as e:
        found = _unwrap(e)
        if found is not None:
            raise found from None
        # a reader error: find the entry that fails and name it
        for entry in entries:
            for key in ("image", "label"):
                try:
                    image_reader(entry[key]).read(entry[key])
                except Exception as read_err:
                    kind = "PNG/JPEG" if entry[key].lower().endswith(PHOTO_EXTENSIONS) else "NIfTI"
                    raise DataError(f"cannot read {key} as {kind}: {read_err}", site, entry[key]) from None
        raise DataError(f"failed to load the site's data: {e}", site) from e


def load_site(
    data_dir: str | os.PathLike,
    site: str,
    size: int,
    splits: Sequence[str] = SPLITS,
    site_dir: str | os.PathLike | None = None,
) -> SiteData:
    """Load, validate and cache one site's splits at ``size x size``.

    Args:
        data_dir: data set folder holding ``dataset.json``.
        site: site name; must be listed in ``dataset.json``.
        size: working size.
        splits: which splits to load.
        site_dir: the site's folder if not ``data_dir/site``.
    """
    try:
        info = load_dataset_info(data_dir)
    except DataError as e:
        if e.site is None:  # name the site that was looking for its data
            raise DataError(e.what, site, e.file) from None
        raise
    if site not in info.sites:
        raise DataError(
            f"site is not listed in dataset.json (sites: {info.sites})", site, Path(data_dir) / "dataset.json"
        )
    datalist = load_datalist(site_dir or Path(data_dir) / site, site)
    out = SiteData(site=site, info=info, spacing=datalist.get("spacing"))
    example = datalist["training"][0]["image"]
    transforms = site_transforms(site, info, size, example)
    for split in splits:
        entries = datalist.get(split, [])
        items = _load_split(entries, transforms, site)
        if items:
            images = torch.stack([it["image"] for it in items])
            labels = torch.stack([it["label"] for it in items])
        else:
            images = torch.zeros((0, info.channels, size, size))
            labels = torch.zeros((0, info.n_classes, size, size))
        # an entry's own spacing (importers write one per case) before the datalist's
        spacing = [
            working_spacing(e.get("spacing") or out.spacing, it["stored_shape"], size) for e, it in zip(entries, items)
        ]
        out.splits[split] = SplitData(
            images, labels, [e["case_id"] for e in entries], [e["slice"] for e in entries], spacing
        )
    return out
