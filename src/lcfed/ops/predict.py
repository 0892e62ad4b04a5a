"""Use a site's personalized model: segment new scans at the hospital, each in its own geometry.

``python -m lcfed predict --model <models>/<job>/best.pt --input PATH --out DIR`` and
``python -m lcfed export --model best.pt --out model.ts`` (see docs/predict.md).

A *scan* is what one progress line reports and what fails on its own:

- a NIfTI volume (``.nii``, ``.nii.gz``): its slices along the last array axis, as the importers cut
  volumes into training slices;
- a 2-D image: a NIfTI slice, or a PNG/JPEG photograph read as the fundus and polyp importers read them;
- one case of a datalist JSON of this bundle (its slice files of one split, in slice order).

Every slice goes through the training pipeline's own steps (:func:`~lcfed.runtime.data.pipeline.image_transforms`:
per-channel z-score, bilinear resize to the checkpoint's working size), then through the site's own
prediction (:meth:`~lcfed.runtime.trainer.SiteTrainer.predict_images`, i.e. the algorithm's ``predict``: for
LC-Fed the calibrated S* from the site's network, head bank, disagreement map and HC), then back to the
slice's own size with MONAI's inverse of that resize. Probabilities are thresholded at 0.5 (the largest
connected component kept per class when the data set asks for it, as in evaluation) and written with the
input's affine by MONAI's ``SaveImage``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcfed.runtime.algorithms import LCFed, get_algorithm
from lcfed.runtime.config import TrainConfig
from lcfed.runtime.data.layout import DATASET_FILE, SPLITS, DataError, DatasetInfo, load_datalist, load_dataset_info
from lcfed.runtime.data.pipeline import PHOTO_EXTENSIONS, SiteData, image_reader, image_transforms, to_channel_first
from lcfed.runtime.metrics import binarize, largest_component
from lcfed.runtime.trainer import CheckpointMismatch, SiteTrainer

__all__ = [
    "NIFTI_EXTENSIONS",
    "EXPORT_METADATA",
    "SiteModel",
    "Scan",
    "PredictionReport",
    "load_site_model",
    "find_scans",
    "check_data_set",
    "label_map",
    "predict_scans",
    "SitePredictor",
    "export_model",
    "load_exported",
    "add_arguments",
    "run_command",
]

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
READABLE = NIFTI_EXTENSIONS + PHOTO_EXTENSIONS
# name of the JSON that an exported model carries (torch.jit extra file): its input/output contract
EXPORT_METADATA = "lcfed.json"


def _one_line(error: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _stem(path: Path) -> str:
    name = path.name
    for ext in NIFTI_EXTENSIONS + PHOTO_EXTENSIONS:
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class SiteModel:
    """A site's personalized checkpoint, rebuilt for prediction.

    Args:
        path: the checkpoint file.
        trainer: the site's :class:`SiteTrainer` restored from it (network, head bank, HC, device and
            mixed precision as in training); prediction goes through its ``predict_images``.
        largest_component: keep the largest connected component per class (the data set's setting).
        kind: the importer that wrote the training data (``prostate`` ...), None for the demo set.
        meta: what the learner recorded with the checkpoint (round, validation Dice, job).
    """

    path: Path
    trainer: SiteTrainer
    largest_component: bool
    kind: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        return self.trainer.data.info.channels

    @property
    def size(self) -> int:
        return self.trainer.config.size

    @property
    def class_names(self) -> list[str]:
        return list(self.trainer.data.info.labels)

    @property
    def site(self) -> str:
        return self.trainer.site

    def describe(self) -> str:
        info = self.trainer.data.info
        return (
            f"{self.trainer.algorithm.name} model of site {self.site!r} ({self.path}), "
            f"{info.channels} channel(s) at {self.size}x{self.size}, classes {self.class_names}, "
            f"device {self.trainer.device}"
        )


def load_site_model(
    path: str | Path, device: str | torch.device | None = None, batch_size: int | None = None
) -> SiteModel:
    """Rebuild a site's trainer from its checkpoint (``best.pt`` or ``last.pt``).

    The checkpoint says everything: algorithm, site list and site, preset and options, channels and
    classes (and, when written by this version, the data set's label codes and post-processing).

    Raises:
        CheckpointMismatch: unreadable file, not a site checkpoint of this bundle, or weights that do not
            fit the model its configuration describes (a checkpoint from another configuration).
    """
    path = Path(path)
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if not path.is_file():
        raise CheckpointMismatch(f"checkpoint {path}: file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch errors alike
        raise CheckpointMismatch(f"checkpoint {path}: not readable as a PyTorch checkpoint ({_one_line(e)})") from None
    if not isinstance(state, dict) or not all(k in state for k in ("identity", "config", "model")):
        raise CheckpointMismatch(f"checkpoint {path}: not a site checkpoint of this bundle (identity, config, model)")
    ident = state["identity"]
    data = state.get("data") or {}
    try:
        config = TrainConfig.from_dict(dict(state["config"]))
        if batch_size:
            config = replace(config, eval_batch_size=int(batch_size))
        names = list(ident["labels"])
        codes = data.get("labels") or {}
        info = DatasetInfo(
            name=str(data.get("name", "")),
            sites=list(ident["sites"]),
            channels=int(ident["channels"]),
            # older checkpoints hold the class names only; the codes then follow the class order
            labels={name: list(codes.get(name, [i + 1])) for i, name in enumerate(names)},
            largest_component=bool(data.get("largest_component", False)),
        )
        site, sites = ident["site"], ident["sites"]
        trainer = SiteTrainer(get_algorithm(ident["algorithm"]), config, SiteData(site, info), sites, site, device)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointMismatch(f"checkpoint {path}: unusable configuration ({_one_line(e)})") from None
    try:
        trainer.load_state_dict(state, source=str(path))
    except CheckpointMismatch:
        raise
    except (RuntimeError, ValueError, KeyError) as e:  # missing, unexpected or differently shaped weights
        first = str(e).strip().splitlines()
        raise CheckpointMismatch(
            f"checkpoint {path} is from another configuration: its weights do not fit the "
            f"{ident['algorithm']!r} model of width {config.width}, {info.channels} channel(s), "
            f"{info.n_classes} class(es) and {len(info.sites)} site(s) its configuration describes "
            f"({_one_line(first[1] if len(first) > 1 else first[0], 160)})"
        ) from None
    return SiteModel(path, trainer, info.largest_component, data.get("kind"), dict(state.get("meta") or {}))


# ---------------------------------------------------------------------------------------------
# What to read
# ---------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """One unit of prediction: a volume, a 2-D image, or the slice files of one datalist case in slice order."""

    name: str
    files: list[Path]


def find_scans(path: str | Path, split: str = "testing") -> list[Scan]:
    """The scans under ``path``: one file, the readable files of a folder, or one split of a datalist JSON.

    ``split`` (``training``, ``validation``, ``testing`` or ``all``) applies to a datalist only.
    Raises :class:`DataError` for a missing path, an unknown file type, a folder with nothing to read
    and a datalist without entries in ``split``.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("input not found", file=path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        scans = [Scan(_stem(p), [p]) for p in files if p.name.lower().endswith(READABLE)]
        if not scans:
            raise DataError(
                f"nothing to read: no NIfTI (.nii, .nii.gz), PNG or JPEG file in this folder "
                f"({len(files)} other file(s))",
                file=path,
            )
        return scans
    if path.name.lower().endswith(".json"):
        return _datalist_scans(path, split)
    if path.name.lower().endswith(READABLE):
        return [Scan(_stem(path), [path])]
    raise DataError("not a NIfTI (.nii, .nii.gz), PNG/JPEG image or datalist JSON file", file=path)


def _datalist_scans(path: Path, split: str) -> list[Scan]:
    datalist = load_datalist(path.parent, path.parent.name, require_files=False, file=path, for_training=False)
    splits = SPLITS if split == "all" else (split,)
    if split != "all" and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {[*SPLITS, 'all']}")
    cases: dict[str, list[tuple[int, Path]]] = {}
    for name in splits:
        for entry in datalist.get(name, []):
            cases.setdefault(str(entry["case_id"]), []).append((int(entry["slice"]), Path(entry["image"])))
    if not cases:
        raise DataError(f"the datalist has no {' / '.join(splits)} entries", file=path)
    return [Scan(case, [f for _, f in sorted(items, key=lambda t: t[0])]) for case, items in cases.items()]


def check_data_set(model: SiteModel, datalist: str | Path) -> list[str]:
    """Check a datalist's data set (``../dataset.json``) against the model; return notes worth printing.

    Raises :class:`CheckpointMismatch` when the data set's channels or classes are not the model's.
    """
    datalist = Path(datalist)
    notes = []
    try:
        site = json.loads(datalist.read_text()).get("site")
    except (OSError, ValueError, AttributeError):
        site = None
    if site and site != model.site:
        notes.append(f"note: {datalist} is site {site!r}'s datalist; the model is site {model.site!r}'s")
    data_dir = datalist.parent.parent
    if not (data_dir / DATASET_FILE).is_file():
        return notes
    info = load_dataset_info(data_dir)
    mine = model.trainer.data.info
    if info.channels != mine.channels or list(info.labels) != list(mine.labels):
        raise CheckpointMismatch(
            f"checkpoint {model.path} is from another configuration than {data_dir / DATASET_FILE}: "
            f"the model takes {mine.channels} channel(s) and predicts {list(mine.labels)}, the data set has "
            f"{info.channels} channel(s) and classes {list(info.labels)}"
        )
    return notes


# ---------------------------------------------------------------------------------------------
# One scan
# ---------------------------------------------------------------------------------------------


@dataclass
class _File:
    """One input file: as loaded (its meta carries the affine), its slices, how they stack back."""

    path: Path
    image: Any  # MetaTensor as loaded
    slices: list[torch.Tensor]  # (channels, H, W)
    volume: bool  # slices along the last spatial axis

    @property
    def photo(self) -> bool:
        return self.path.name.lower().endswith(PHOTO_EXTENSIONS)


def _read_file(path: Path, channels: int, volume_normalization: Callable[[np.ndarray], np.ndarray] | None) -> _File:
    """Read one input file into (channels, H, W) slices; ``volume_normalization`` applies to a volume's slices."""
    from monai.transforms import LoadImage

    if not path.is_file():
        raise DataError("file not found", file=path)
    if path.stat().st_size == 0:
        raise DataError("empty file (0 bytes)", file=path)
    photo = path.name.lower().endswith(PHOTO_EXTENSIONS)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = LoadImage(reader=image_reader(path), image_only=True)(str(path))
    except Exception as load_error:  # nibabel and Pillow raise many types for truncated or foreign files
        reason: BaseException = load_error
        try:  # LoadImage wraps the reader's own error in an install hint; the reader's says what is wrong
            image_reader(path).read(str(path))
        except Exception as reader_error:
            reason = reader_error
        kind = "a PNG/JPEG image" if photo else "NIfTI"
        raise DataError(f"cannot read as {kind} ({type(reason).__name__}: {_one_line(reason)})", file=path) from None
    array = torch.as_tensor(np.asarray(image))
    shape = tuple(array.shape)
    if array.numel() == 0:
        raise DataError(f"empty image (array shape {shape})", file=path)
    rgb_last = channels == 3 and shape[-1] in (3, 4)
    if photo or array.ndim == 2 or (array.ndim == 3 and (rgb_last or shape[-1] == 1)):
        planes, volume = [array], False
    elif array.ndim == 3 or (array.ndim == 4 and (shape[-1] == 1 or rgb_last)):
        planes, volume = [array[:, :, z] for z in range(shape[2])], True
    elif array.ndim == 4:
        raise DataError(f"image has {shape[-1]} channels (last axis of {shape}), the model takes {channels}", file=path)
    else:
        raise DataError(f"expected a 2-D image or a 3-D volume, got array shape {shape}", file=path)
    slices = []
    for plane in planes:
        x = to_channel_first(plane, False, None, str(path)).to(torch.float32)
        if x.shape[0] != channels:
            raise DataError(f"image has {x.shape[0]} channel(s), the model takes {channels}", file=path)
        if not torch.isfinite(x).all():
            raise DataError("image holds NaN or Inf values", file=path)
        if volume_normalization is not None and volume:
            x = torch.as_tensor(np.stack([volume_normalization(c.numpy()) for c in x]))
        slices.append(x)
    return _File(path, image, slices, volume)


def label_map(mask: np.ndarray) -> np.ndarray:
    """Binary class masks (C, *spatial) -> one uint8 label map: 0 background, c + 1 where class c is present.

    Classes are independent (multi-label) channels; where several are present the later class wins,
    e.g. fundus disc (1) then cup (2): the cup lies inside the disc.
    """
    out = np.zeros(mask.shape[1:], dtype=np.uint8)
    for c in range(mask.shape[0]):
        out[np.asarray(mask[c], dtype=bool)] = c + 1
    return out


def _keep_largest(masks: list[np.ndarray]) -> list[np.ndarray]:
    """Largest connected component per class over the whole scan (the case's 3-D volume, as in evaluation)."""
    if len(masks) == 1:
        return [largest_component(masks[0])]
    if len({m.shape for m in masks}) == 1:  # the 2-D slice files of one case: stack them as the case volume
        volume = largest_component(np.stack(masks, axis=-1))
        return [volume[..., i] for i in range(len(masks))]
    return [largest_component(m) for m in masks]


class _Writer:
    """MONAI ``SaveImage`` per output kind: NIfTI with the input's affine, or PNG for photographs."""

    def __init__(self, out_dir: Path):
        from monai.transforms import SaveImage

        self.out_dir = out_dir
        common = {"output_dir": str(out_dir), "separate_folder": False, "print_log": False}
        self.nifti_labels = SaveImage(output_ext=".nii.gz", output_dtype=np.uint8, **common)
        self.png_labels = SaveImage(output_ext=".png", output_dtype=np.uint8, **common)
        # the bundle reads PNG without reversing the axes (PILReader(reverse_indexing=False)); write them alike
        self.png_labels.set_options(write_kwargs={"reverse_indexing": False})
        self.maps = SaveImage(output_ext=".nii.gz", output_dtype=np.float32, **common)

    def write(self, kind: str, array: np.ndarray, source: _File, spatial: Sequence[int]) -> Path:
        from monai.data import MetaTensor

        meta = dict(source.image.meta)
        meta["spatial_shape"] = np.asarray(spatial)
        if kind == "seg":
            saver = self.png_labels if source.photo else self.nifti_labels
        else:
            saver = self.maps
        name = self.out_dir / f"{_stem(source.path)}_{kind}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            saver(MetaTensor(torch.as_tensor(array), meta=meta), filename=name)
        return Path(f"{name}{saver.output_ext}")


def _predict_scan(
    model: SiteModel,
    scan: Scan,
    writer: _Writer,
    probabilities: bool = False,
    disagreement: bool = False,
    largest_cc: bool | None = None,
) -> tuple[list[Path], int]:
    """Segment one scan and write its outputs; returns the files written and the number of slices.

    Raises :class:`DataError` naming the file for anything wrong with the scan's input.
    """
    from monai.data import MetaTensor
    from monai.transforms import Compose

    from lcfed.ops.data.importers import VOLUME_KINDS, normalize_slice

    # a model trained on an imported volume data set saw slices the importer had normalised: do the same to
    # raw volumes (2-D slice files, such as a datalist's, are stored normalised already)
    normalization = normalize_slice if model.kind in VOLUME_KINDS else None
    files = [_read_file(p, model.channels, normalization) for p in scan.files]
    steps = Compose(image_transforms(model.size))
    inputs = [steps({"image": MetaTensor(s)})["image"] for f in files for s in f.slices]
    batch = torch.stack([x.as_tensor() for x in inputs])

    trainer = model.trainer
    outputs = {"prob": trainer.predict_images(batch)}
    if disagreement:  # LC-Fed's U, from the algorithm's own intermediate maps
        outputs["disagreement"] = trainer.explain_images(batch)["disagreement"]
    # back to each slice's own size: MONAI's inverse of the resize each slice went through
    own: dict[str, list[np.ndarray]] = {}
    for kind, maps in outputs.items():
        own[kind] = []
        for x, m in zip(inputs, maps):
            y = MetaTensor(m)
            y.applied_operations = list(x.applied_operations)
            own[kind].append(steps.inverse({"image": y})["image"].numpy())

    per_file: dict[str, list[np.ndarray]] = {kind: [] for kind in own}
    start = 0
    for f in files:
        for kind, maps in own.items():
            part = maps[start : start + len(f.slices)]
            per_file[kind].append(np.stack(part, axis=-1) if f.volume else part[0])
        start += len(f.slices)
    masks = [binarize(p) for p in per_file["prob"]]
    if model.largest_component if largest_cc is None else largest_cc:
        masks = _keep_largest(masks)
    written = []
    for i, f in enumerate(files):
        spatial = masks[i].shape[1:]
        if probabilities:
            written.append(writer.write("prob", per_file["prob"][i], f, spatial))
        if disagreement:
            written.append(writer.write("disagreement", per_file["disagreement"][i], f, spatial))
        written.append(writer.write("seg", label_map(masks[i]), f, spatial))
    return written, len(inputs)


# ---------------------------------------------------------------------------------------------
# Many scans
# ---------------------------------------------------------------------------------------------


@dataclass
class PredictionReport:
    """What a prediction run wrote and what failed (scan name -> one-line reason)."""

    written: dict[str, list[Path]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    slices: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def predict_scans(
    model: SiteModel,
    scans: Sequence[Scan],
    out_dir: str | Path,
    probabilities: bool = False,
    disagreement: bool = False,
    largest_cc: bool | None = None,
    log: Callable[[str], None] | None = print,
) -> PredictionReport:
    """Segment every scan into ``out_dir``; a scan that fails is reported and the others still written.

    Writes ``<stem>_seg`` (label map) per input file, ``<stem>_prob`` / ``<stem>_disagreement`` when
    asked, and ``predictions.json`` (the model, the class codes, every scan's outputs and failures).
    """
    if disagreement and not isinstance(model.trainer.algorithm, LCFed):
        raise ValueError(f"--disagreement: the {model.trainer.algorithm.name!r} model has no head bank to disagree")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _Writer(out_dir)
    report = PredictionReport()
    claimed: dict[str, str] = {}
    t0 = time.perf_counter()
    for i, scan in enumerate(scans, 1):
        t_scan = time.perf_counter()
        try:
            for f in scan.files:  # two inputs must not write the same output name
                other = claimed.setdefault(_stem(f), str(f))
                if other != str(f):
                    raise DataError(f"has the same name as {other}; its outputs would overwrite that file's", file=f)
            written, n = _predict_scan(model, scan, writer, probabilities, disagreement, largest_cc)
        except Exception as e:  # one bad scan must not stop the others
            reason = str(e) if isinstance(e, DataError) else f"[file {scan.files[0]}] {type(e).__name__}: {e}"
            report.failed[scan.name] = _one_line(reason)
            print(f"error: {report.failed[scan.name]}", file=sys.stderr, flush=True)
            status = "failed"
        else:
            report.written[scan.name] = written
            report.slices += n
            status = f"{n} slice(s) in {time.perf_counter() - t_scan:.1f} s"
        elapsed = time.perf_counter() - t0
        if log:
            eta = elapsed / i * (len(scans) - i)
            log(f"scan {i} of {len(scans)}: {scan.name}: {status}; ETA {_clock(eta)}")
    report.seconds = time.perf_counter() - t0
    manifest = {
        "model": str(model.path),
        "algorithm": model.trainer.algorithm.name,
        "site": model.site,
        "round": model.meta.get("round"),
        "label_map": {"0": "background", **{str(c + 1): n for c, n in enumerate(model.class_names)}},
        "overlap": "where classes overlap the later class is written (e.g. cup over disc)",
        "threshold": 0.5,
        "largest_component": model.largest_component if largest_cc is None else largest_cc,
        "scans": {name: [str(p) for p in paths] for name, paths in report.written.items()},
        "failed": report.failed,
    }
    (out_dir / "predictions.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return report


# ---------------------------------------------------------------------------------------------
# A portable model file
# ---------------------------------------------------------------------------------------------


class SitePredictor(torch.nn.Module):
    """A site's final prediction as one module, to trace: forward = the algorithm's own ``predict``.

    Holds the site's network (with HC) and, as buffers, the head bank it calibrates against, so that a
    traced copy carries all three and moves between devices with ``.to()``.
    """

    def __init__(self, trainer: SiteTrainer):
        super().__init__()
        self.network = trainer.model
        bank = trainer.ctx.head_bank.heads
        for i, site in enumerate(sorted(bank)):
            for key, tensor in bank[site].items():
                # the same tensor objects the head bank hands to predict: traced as module state, not constants
                self.register_buffer(f"head_bank_{i}_{key.replace('.', '_')}", tensor)
        self._predict = lambda image: trainer.algorithm.predict(trainer.ctx, image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self._predict(image)


IMPORTER_SCALING = "raw volumes only: the importer's per-slice scaling first, clip to [min, 99th percentile] -> [0, 1]"


def _contract(model: SiteModel) -> dict[str, Any]:
    from lcfed.ops.data.importers import VOLUME_KINDS

    size, channels = model.size, model.channels
    return {
        "format": "TorchScript (torch.jit.trace); load with torch.jit.load, no other package needed",
        "algorithm": model.trainer.algorithm.name,
        "site": model.site,
        "sites": list(model.trainer.sites),
        "checkpoint": str(model.path),
        "round": model.meta.get("round"),
        "val_dice": model.meta.get("val_dice"),
        "input": {
            "shape": ["N", channels, size, size],
            "dtype": "float32",
            "preprocessing": [
                "one 2-D slice per item; a volume is cut along its last array axis",
                *([IMPORTER_SCALING] if model.kind in VOLUME_KINDS else []),
                "per channel: (x - mean) / std over the slice (population std; std 0 counts as 1)",
                f"bilinear resize to {size} x {size} (align_corners=False, no anti-aliasing)",
            ],
        },
        "output": {
            "shape": ["N", len(model.class_names), size, size],
            "dtype": "float32",
            "meaning": "per-class probabilities (independent sigmoid channels, may overlap)",
            "classes": model.class_names,
            "threshold": 0.5,
            "largest_component": model.largest_component,
            "label_map": "0 background, c + 1 where class c >= 0.5; a later class overwrites an earlier one",
            "postprocessing": "resize back to the slice's own size (bilinear) before thresholding",
        },
    }


def export_model(model_path: str | Path, out: str | Path, check: bool = True) -> Path:
    """Write the site's network, head bank and HC as one TorchScript file (CPU, float32).

    The module takes preprocessed slices (N, channels, size, size) and returns the site's final
    probabilities (N, C, size, size); its input/output contract rides along as the extra file
    ``lcfed.json``. With ``check`` the traced module is compared with the checkpoint's own prediction
    on a batch of another size before it is written.
    """
    model = load_site_model(model_path, device="cpu")
    predictor = SitePredictor(model.trainer).eval()
    example = torch.randn(2, model.channels, model.size, model.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings: the HC flag and bank size are fixed for this site
        traced = torch.jit.trace(predictor, example, check_trace=False)
    if check:
        probe = torch.randn(3, model.channels, model.size, model.size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model.trainer.predict_images(probe)
            got = traced(probe)
        if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-5):
            raise RuntimeError(f"the traced model of {model_path} does not reproduce its prediction; nothing written")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(traced, str(out), _extra_files={EXPORT_METADATA: json.dumps(_contract(model), indent=2)})
    return out


def load_exported(path: str | Path, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """An exported model and its contract (what a hospital's own code does, with torch alone)."""
    extra = {EXPORT_METADATA: ""}
    module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    return module, json.loads(extra[EXPORT_METADATA])


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The ``predict`` and ``export`` subcommands."""
    pr = sub.add_parser("predict", help="segment new scans with a site's personalized model (best.pt)")
    pr.add_argument("--model", required=True, help="the site's checkpoint, <models>/<job>/best.pt")
    pr.add_argument("--input", required=True, help="a NIfTI/PNG/JPEG file, a folder of them, or a datalist JSON")
    pr.add_argument("--out", required=True, help="output folder")
    pr.add_argument("--split", default="testing", choices=[*SPLITS, "all"], help="datalist split (default testing)")
    pr.add_argument("--probabilities", action="store_true", help="also write per-class probability maps")
    pr.add_argument("--disagreement", action="store_true", help="also write LC-Fed's disagreement map U")
    pr.add_argument(
        "--largest-component",
        dest="largest_component",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the largest connected component per class (default: as the training data set says)",
    )
    pr.add_argument("--device", help="cpu or cuda (default: CUDA when available)")
    pr.add_argument("--batch-size", dest="batch_size", type=int, help="slices per forward pass (default: preset's)")
    ex = sub.add_parser("export", help="write a site's model as one TorchScript file for plain torch")
    ex.add_argument("--model", required=True, help="the site's checkpoint, <models>/<job>/best.pt")
    ex.add_argument("--out", required=True, help="output file, e.g. model.ts")


def run_command(args: argparse.Namespace) -> int:
    """``predict``: 0 when every scan was written, 1 when some failed. ``export``: 0."""
    if args.command == "export":
        out = export_model(args.model, args.out)
        _, contract = load_exported(out)
        print(f"exported {out}: input {contract['input']['shape']}, output {contract['output']['shape']}")
        return 0
    model = load_site_model(args.model, args.device, args.batch_size)
    scans = find_scans(args.input, args.split)
    if str(args.input).lower().endswith(".json"):
        for note in check_data_set(model, args.input):
            print(note)
    print(f"{model.describe()}; {len(scans)} scan(s) from {args.input}", flush=True)
    report = predict_scans(
        model,
        scans,
        args.out,
        args.probabilities,
        args.disagreement,
        args.largest_component,
        log=lambda line: print(line, flush=True),
    )
    per_slice = report.seconds / max(report.slices, 1)
    print(
        f"wrote {len(report.written)} scan(s) ({report.slices} slices, {per_slice * 1000:.0f} ms per slice) to "
        f"{args.out}" + (f"; {len(report.failed)} failed" if report.failed else "")
    )
    return 0 if report.ok else 1
