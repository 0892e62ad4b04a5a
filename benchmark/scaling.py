"""How LC-Fed grows with the number of sites K: FLARE's simulator at K sites, and the head bank in a local step.

    python benchmark/scaling.py [--sites 2,4,8,16,32] [--rounds 3] [--bank-sites 2,4,8,16,32] [--out benchmark/scaling]

Per K in ``--sites``: a tiny-preset demo set with K sites (32x32, built in-process), then ``lcfed`` in
FLARE's simulator for ``--rounds`` rounds (one client process per site; ``--parallel`` caps them), and
from the server's own records: wall time per round (the first round dropped: process start-up and the
first task pull), the server process's peak resident memory, and the bytes each site received and sent
per round (:mod:`lcfed.runtime.fl.traffic`). Per K in ``--bank-sites``, in-process with the trainer
(no FLARE): the share of a local step that uses the head bank (an HC step of the staged schedule: the
K-1 other heads on the feature map, the disagreement map and its peaks) spent on the head bank, at the
``--bank-preset`` (default demo). Writes ``OUT/results.json`` and ``OUT/table.md`` with the command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def simulate(k: int, rounds: int, work: Path, parallel: int | None) -> dict[str, Any]:
    """One simulator run of lcfed at the tiny preset with ``k`` sites; its per-round numbers."""
    from lcfed.ops.data.demo import build_demo
    from lcfed.ops.jobs import JobSpec
    from lcfed.ops.run import client_slots, prepare_workspace, run_simulator
    from lcfed.runtime.data.layout import load_dataset_info
    from lcfed.runtime.fl.aggregator import ROUNDS_FILE
    from lcfed.runtime.fl.traffic import TRAFFIC_FILE

    data = work / f"data{k}"
    if not (data / "dataset.json").is_file():
        build_demo(data, n_sites=k, size=32, seed=0, verbose=False)
    info = load_dataset_info(data)
    spec = JobSpec(algorithm="lcfed", sites=list(info.sites), preset="tiny", options={"rounds": rounds}, num_threads=1)
    ws = work / f"run{k}"
    slots = client_slots(parallel, k)
    done = ws / "scaling_result.json"  # a finished run of the same K, rounds and processes is reused (--work)
    if done.is_file():
        kept = json.loads(done.read_text())
        if (kept.get("rounds"), kept.get("parallel")) == (rounds, slots):
            return kept
    prepare_workspace(ws, overwrite=True)
    t0 = time.perf_counter()
    sim = run_simulator(spec, data, ws, parallel=parallel, show=lambda _: None)
    wall = time.perf_counter() - t0
    app = sim / "server/simulate_job/app_server"
    record = json.loads((app / ROUNDS_FILE).read_text())["rounds"]
    traffic = json.loads((app / TRAFFIC_FILE).read_text())
    per_round = [r["time"] for r in record][1:]
    result = {
        "sites": k,
        "rounds": rounds,
        "parallel": slots,
        "wall_s": wall,
        "round_s": float(np.mean(per_round)) if per_round else float("nan"),
        "server_peak_rss_mb": max(r.get("server_peak_rss_mb") or 0 for r in record),
        "received_per_site_round": float(np.mean([e["bytes"] for e in traffic["to_site"]])),
        "sent_per_site_round": float(np.mean([e["bytes"] for e in traffic["from_site"]])),
    }
    done.write_text(json.dumps(result))
    return result


def bank_share(k: int, preset: str, steps: int, data_dir: Path) -> dict[str, Any]:
    """Time HC steps of site 0 in a K-site federation: total and the part in the head bank (``maps``)."""
    import torch

    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.config import make_config
    from lcfed.runtime.contract import bank_key
    from lcfed.runtime.data.pipeline import load_site
    from lcfed.runtime.trainer import SiteTrainer

    torch.set_num_threads(1)
    config = make_config(preset, iterations=steps, personal_iterations=0)
    sites = ["site-a"] + [f"peer-{i}" for i in range(1, k)]
    data = load_site(data_dir, "site-a", config.size)
    algo = get_algorithm("lcfed")
    trainer = SiteTrainer(algo, config, data, sites, "site-a")
    state = trainer.model.state_dict()
    gen = torch.Generator().manual_seed(0)
    bank = {}
    for s in sites:  # K banked heads, as the server sends them
        for key in ("head.weight", "head.bias"):
            bank[bank_key(s, key)] = (torch.randn(state[key].shape, generator=gen) * 0.1).numpy()
    trainer.ctx.head_bank.update(bank)
    spent = [0.0]
    maps = algo.maps  # the site's head against the K-1 banked heads: disagreement map and peaks

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = maps(*args, **kwargs)
        spent[0] += time.perf_counter() - t
        return out

    algo.maps = timed
    hc_round = config.hc_start_round
    try:
        trainer.train_round(hc_round, iterations=2)  # warm-up
        spent[0] = 0.0
        t0 = time.perf_counter()
        trainer.train_round(hc_round, iterations=steps)
        total = time.perf_counter() - t0
    finally:
        algo.maps = maps
    return {
        "sites": k,
        "preset": preset,
        "steps": steps,
        "step_ms": 1e3 * total / steps,
        "bank_ms": 1e3 * spent[0] / steps,
        "bank_share": spent[0] / total,
        "hc_rounds_share": config.hc_stage_rounds / algo.total_rounds(config),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sites", default="2,4,8,16,32", help="site counts for the simulator runs ('' for none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parallel", type=int, help="client processes at a time (default: one per site)")
    parser.add_argument("--bank-sites", default="2,4,8,16,32", help="site counts for the in-process head-bank timing")
    parser.add_argument("--bank-preset", default="demo")
    parser.add_argument("--bank-steps", type=int, default=10)
    parser.add_argument("--work", help="folder for the data sets and runs (default: a temporary one)")
    parser.add_argument("--out", default="benchmark/scaling")
    args = parser.parse_args()
    command = "python benchmark/scaling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        runs = []
        for k in [int(x) for x in args.sites.split(",") if x]:
            runs.append(simulate(k, args.rounds, work, args.parallel))
            print(json.dumps(runs[-1]), flush=True)
        bank = []
        if args.bank_sites:
            from lcfed.ops.data.demo import build_demo
            from lcfed.runtime.config import make_config

            bank_data = work / "bank-data"
            if not (bank_data / "dataset.json").is_file():
                size = make_config(args.bank_preset).size
                build_demo(bank_data, n_sites=2, size=size, seed=0, verbose=False)
            for k in [int(x) for x in args.bank_sites.split(",") if x]:
                bank.append(bank_share(k, args.bank_preset, args.bank_steps, bank_data))
                print(json.dumps(bank[-1]), flush=True)
    (out / "results.json").write_text(json.dumps({"command": command, "simulator": runs, "head_bank": bank}, indent=2))
    lines = [f"Command: `{command}`", ""]
    if runs:
        lines += [
            "FLARE simulator, lcfed, tiny preset, one process per site unless capped; per-round numbers from the "
            "server's records (first round dropped from the time).",
            "",
            "| K | rounds | client processes | s/round | server peak RSS (MiB) | bytes received/site/round | "
            "bytes sent/site/round |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['sites']} | {r['rounds']} | {r['parallel']} | {r['round_s']:.2f} | {r['server_peak_rss_mb']:.0f} | "
            f"{r['received_per_site_round']:.0f} | {r['sent_per_site_round']:.0f} |"
            for r in runs
        ]
        lines.append("")
    if bank:
        lines += [
            f"Head bank in a local step, in-process ({bank[0]['preset']} preset, {bank[0]['steps']} HC steps of "
            "site 0, one thread): the K-1 other heads on the feature map, the disagreement map and its peaks. "
            f"The staged schedule uses the bank only in its HC rounds "
            f"({bank[0]['hc_rounds_share']:.0%} of the rounds).",
            "",
            "| K | step (ms) | head bank (ms) | share of the step |",
            "|---|---|---|---|",
        ]
        lines += [f"| {b['sites']} | {b['step_ms']:.1f} | {b['bank_ms']:.2f} | {b['bank_share']:.1%} |" for b in bank]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
