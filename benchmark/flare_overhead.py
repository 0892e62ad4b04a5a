"""FLARE overhead: wall time of a round in the simulator vs the same local work in the plain trainer.

    python benchmark/flare_overhead.py --data data/demo [--rounds 4] [--algo lcfed]

Both runs use the same job settings (demo preset unless told otherwise), the same sites and data.
The plain run is the in-process federation of :mod:`lcfed.ops.federation` (no FLARE; sites one after the
other, torch using every core); the simulator run is ``lcfed run`` (one client process per site).
A round's time excludes start-up: the first round (data loading, process start) is dropped on both
sides, and the simulator's round time is measured on the server from the start of the round to its
aggregation. The plain run is repeated before and after the simulator run (this machine is shared and
noisy); the ratio uses their mean.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def plain_rounds(algo: str, data: str, rounds: int, preset: str) -> list[float]:
    from lcfed.ops.federation import build_trainers, run_federation
    from lcfed.runtime.config import make_config

    torch.set_num_threads(os.cpu_count() or 1)
    trainers = build_trainers(algo, data, make_config(preset, rounds=rounds))
    records = run_federation(trainers, rounds, log=None)
    return [r["time"] for r in records][1:]


def simulator_rounds(algo: str, data: str, rounds: int, preset: str, workspace: Path) -> tuple[list[float], float]:
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import run_simulator
    from lcfed.runtime.data.layout import load_dataset_info

    info = load_dataset_info(data)
    spec = JobSpec(
        algorithm=algo,
        sites=list(info.sites),
        preset=preset,
        options={"rounds": rounds},
        in_channels=info.channels,
        n_classes=info.n_classes,
    )
    t0 = time.perf_counter()
    sim_ws = run_simulator(spec, data, workspace, show=lambda line: None)
    total = time.perf_counter() - t0
    record = json.loads((sim_ws / "server/simulate_job/app_server/lcfed_rounds.json").read_text())
    return [r["time"] for r in record["rounds"]][1:], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--algo", default="lcfed")
    parser.add_argument("--preset", default="demo")
    args = parser.parse_args()

    before = plain_rounds(args.algo, args.data, args.rounds, args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        sim, total = simulator_rounds(args.algo, args.data, args.rounds, args.preset, Path(tmp))
    after = plain_rounds(args.algo, args.data, args.rounds, args.preset)
    plain = statistics.mean(before + after)
    simulated = statistics.mean(sim)
    print(f"algorithm {args.algo}, preset {args.preset}, {args.rounds} rounds (first round of each run dropped)")
    print(f"plain trainer, before : {', '.join(f'{t:.2f}' for t in before)} s/round")
    print(
        f"FLARE simulator       : {', '.join(f'{t:.2f}' for t in sim)} s/round (whole run incl. start-up {total:.0f} s)"
    )
    print(f"plain trainer, after  : {', '.join(f'{t:.2f}' for t in after)} s/round")
    print(f"ratio simulator/plain : {simulated / plain:.3f}  ({simulated:.2f} s vs {plain:.2f} s per round)")


if __name__ == "__main__":
    main()
