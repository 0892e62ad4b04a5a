"""Prediction time per slice at a preset's size: the site's model, its exported TorchScript file, and a whole scan.

    python benchmark/predict_speed.py [--preset demo] [--model best.pt] [--slices 16] [--repeats 20] [--device cpu]

Without ``--model`` it times a freshly initialised LC-Fed site model of the preset (the demo's four sites,
one channel, two classes) with a full head bank and HC switched on, so every part of the site's
prediction runs (network, all banked heads, disagreement map, peaks, HC); weights do not change the time.
Three figures:

- *model*: ``SiteTrainer.predict_images`` on one batch of preprocessed slices (the preset's evaluation
  batch), per slice;
- *exported*: the TorchScript file of ``python -m lcfed export`` on the same batch, per slice;
- *scan*: ``python -m lcfed predict``'s own path on a synthetic NIfTI volume of 197 x 233 x ``--slices``
  (the ICBM152 template's in-plane size): read, per-slice preprocessing, prediction, inverse resize,
  threshold, label map written with the volume's affine; per slice.

The three run in turn, ``--repeats`` times, and the medians are printed, in wall-clock time and in the
process's CPU time (what other processes on a shared machine do not add to); the load average is
printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def _interleaved(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Median wall-clock and process CPU seconds of one call of each variant, run in turn (shared machine)."""
    for fn in variants.values():  # warm-up
        fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in variants}


def _synthetic_checkpoint(preset: str, folder: Path) -> Path:
    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.config import make_config
    from lcfed.runtime.contract import bank_key
    from lcfed.runtime.data.layout import DatasetInfo
    from lcfed.runtime.data.pipeline import SiteData
    from lcfed.runtime.trainer import SiteTrainer

    sites = ["site-a", "site-b", "site-c", "site-d"]
    info = DatasetInfo(name="icbm152-demo", sites=sites, channels=1, labels={"tissue": [1, 2], "wm": [2]})
    trainer = SiteTrainer(get_algorithm("lcfed"), make_config(preset), SiteData("site-a", info), sites, "site-a", "cpu")
    gen = torch.Generator().manual_seed(0)
    bank = {}
    for site in sites:
        bank[bank_key(site, "head.weight")] = (
            torch.randn(trainer.model.head.weight.shape, generator=gen) * 0.3
        ).numpy()
        bank[bank_key(site, "head.bias")] = np.zeros(trainer.model.head.bias.shape, np.float32)
    trainer.ctx.head_bank.update(bank)
    trainer.model.hc.trained.fill_(True)  # the calibrated output S*, as after HC training
    path = folder / "best.pt"
    trainer.save(path, round=0)
    return path


def main() -> None:
    import nibabel as nib

    from lcfed.ops.predict import export_model, find_scans, load_exported, load_site_model, predict_scans

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="demo", help="preset of the synthetic model (default demo)")
    parser.add_argument("--model", help="time this checkpoint instead of a synthetic one")
    parser.add_argument("--slices", type=int, default=16, help="slices of the synthetic volume (default 16)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu", help="device of the model figures (the exported file is CPU)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_path = Path(args.model) if args.model else _synthetic_checkpoint(args.preset, tmp)
        model = load_site_model(model_path, device=args.device)
        n = model.trainer.config.eval_batch_size
        batch = torch.randn(n, model.channels, model.size, model.size, generator=torch.Generator().manual_seed(1))

        exported_file = export_model(model_path, tmp / "model.ts")
        module, _ = load_exported(exported_file)
        volume = (np.random.default_rng(0).random((197, 233, args.slices)) * 1000).astype(np.int16)
        nib.save(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.5, 1.0])), tmp / "scan.nii.gz")
        scans = find_scans(tmp / "scan.nii.gz")

        def run_exported() -> None:
            with torch.no_grad():
                module(batch)

        whole = f"whole scan (197 x 233 x {args.slices} NIfTI: read, preprocess, predict, resample back, write)"
        runs = {  # name: (slices per call, call)
            f"model (`SiteTrainer.predict_images`, batches of {n})": (n, lambda: model.trainer.predict_images(batch)),
            f"exported TorchScript file, batches of {n}": (n, run_exported),
            whole: (args.slices, lambda: predict_scans(model, scans, tmp / "out", log=None)),
        }
        variants = {name: fn for name, (_, fn) in runs.items()}
        times = _interleaved(variants, args.repeats)

    load = os.getloadavg()[0]
    print(
        f"{model.trainer.algorithm.name} at {model.size} x {model.size} (preset {model.trainer.config.preset}, width "
        f"{model.trainer.config.width}), {model.channels} channel(s), {len(model.class_names)} classes, "
        f"{len(model.trainer.sites)} sites; device {model.trainer.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPU(s) ({platform.processor() or platform.machine()}), "
        f"load average {load:.1f}"
    )
    print("| what | ms per slice (wall clock) | ms per slice (CPU time) |")
    print("|---|---|---|")
    for name, (per, _) in runs.items():
        wall, cpu = times[name]
        print(f"| {name} | {wall / per * 1000:.1f} | {cpu / per * 1000:.1f} |")


if __name__ == "__main__":
    main()
