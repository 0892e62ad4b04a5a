"""Communication per site and round (and per run) at any preset, without running a federation.

    python benchmark/communication.py [--preset paper] [--sites 4] [--channels 3] [--classes 2]
                                      [--quantize float16,adaquant] [--growth 2,4,8,16,32]

For each algorithm the site's outgoing message is built exactly as the learner builds it (the contract's
shared keys plus the banked head, a WEIGHTS DXO as a FLARE Shareable) and serialized with FLARE's fobs,
which is what :mod:`lcfed.runtime.fl.traffic` measures on a real run (its ``payload``: FLARE adds about
1 kB of task headers on the wire). The message back to a site is the shared model plus the head bank (one
head per site). ``--quantize`` passes both messages through the job's quantization filter
(:class:`lcfed.runtime.fl.quantization.MessageQuantizer`); float16 sizes are exact for any weights, adaquant
sizes depend on the values (bz2 compression) and are computed here on the seeded initial model, so a run
measures them on the wire. ``--growth`` prints how the message back grows with the number of sites.
``lcfed bench`` measures the same on the wire at the demo preset; this script shows what any preset costs.
For staged HC the "HC round" column is a site's message in an HC round (network frozen: the banked head
only, see ``Algorithm.head_only``); the server still sends the whole message back in those rounds.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def message_bytes(data: dict[str, np.ndarray], quantize: str = "") -> int:
    """Serialized size of a WEIGHTS DXO holding ``data``, after the job's quantization filter if any."""
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    from lcfed.runtime.fl.quantization import MessageQuantizer

    common_decomposers.register()  # numpy arrays, as in every FLARE process
    shareable = DXO(data_kind=DataKind.WEIGHTS, data=dict(data)).to_shareable()
    if quantize:
        shareable = MessageQuantizer(quantize).process(shareable, FLContext())
    return len(fobs.dumps(shareable))


def messages(name: str, preset: str, n_sites: int, channels: int, classes: int) -> tuple[dict, dict]:
    """(site->server, server->site) arrays of ``name`` at ``preset`` for a federation of ``n_sites``."""
    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.algorithms.base import ModelSpec
    from lcfed.runtime.config import make_config
    from lcfed.runtime.contract import bank_key

    cfg = make_config(preset)
    algo = get_algorithm(name)
    torch_state = algo.build_model(ModelSpec(channels, classes, n_sites, cfg.width)).state_dict()
    state = {k: v.detach().float().numpy() for k, v in torch_state.items()}
    up = {k: v for k, v in state.items() if algo.contract.is_shared(k) or algo.contract.is_banked(k)}
    down = {k: v for k, v in state.items() if algo.contract.is_shared(k)}
    for site in range(n_sites):
        for k in state:
            if algo.contract.is_banked(k):
                down[bank_key(f"site-{site}", k)] = state[k]
    return up, down


def table(args: argparse.Namespace) -> list[dict[str, Any]]:
    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.config import make_config

    cfg = make_config(args.preset)
    rows = []
    for name in args.algos.split(","):
        algo = get_algorithm(name)
        up, down = messages(name, args.preset, args.sites, args.channels, args.classes)
        pcs = sum(v.size for k, v in up.items() if k.startswith("pcs."))
        hc_rounds = algo.total_rounds(cfg) - cfg.rounds
        head = {k: v for k, v in up.items() if algo.contract.is_banked(k)}
        for q in [""] + [t for t in args.quantize.split(",") if t]:
            rows.append(
                {
                    "algorithm": name,
                    "quantize": q or "float32",
                    "up": message_bytes(up, q),
                    "down": message_bytes(down, q),
                    "values": sum(v.size for v in up.values()),
                    "pcs": pcs,
                    "rounds": cfg.rounds,
                    "hc_rounds": hc_rounds,
                    "hc_up": message_bytes(head, q) if hc_rounds else 0,
                }
            )
    return rows


def per_run_up(row: dict[str, Any]) -> int:
    """Bytes a site sends in a whole run: its network rounds, then its (head-only) staged HC rounds."""
    return row["up"] * row["rounds"] + row["hc_up"] * row["hc_rounds"]


def main() -> None:
    from lcfed.runtime.config import make_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--algos", default="fedavg,fedrep,lcfed,lcfed-private-embedding,lcfed-pn")
    parser.add_argument("--quantize", default="", help="comma-separated quantization types to add (e.g. float16)")
    parser.add_argument("--growth", default="", help="comma-separated site counts: the message back per K")
    args = parser.parse_args()

    cfg = make_config(args.preset)
    rows = table(args)
    base = {r["quantize"]: r for r in rows if r["algorithm"] == rows[0]["algorithm"]}
    print(
        f"preset {args.preset} (width {cfg.width}, {cfg.rounds} rounds), {args.sites} sites, {args.channels} "
        f"channel(s), {args.classes} class(es); serialized FLARE messages per site"
    )
    print(
        f"  {'algorithm':23s} {'type':9s} {'site->server':>13s} {'vs ' + rows[0]['algorithm']:>10s} "
        f"{'vs fp32':>8s} {'server->site':>13s} {'vs fp32':>8s} {'per run, each way':>18s} "
        f"{'values sent':>12s} {'of which PCS':>13s} {'HC round':>10s}"
    )
    fp32 = {r["algorithm"]: r for r in rows if r["quantize"] == "float32"}
    for r in rows:
        ref = fp32[r["algorithm"]]
        print(
            f"  {r['algorithm']:23s} {r['quantize']:9s} {r['up'] / 1e3:10.1f} kB "
            f"{r['up'] / base[r['quantize']]['up'] - 1:+10.2%} {r['up'] / ref['up']:7.3f}x "
            f"{r['down'] / 1e3:10.1f} kB {r['down'] / ref['down']:7.3f}x "
            f"{per_run_up(r) / 1e6:7.1f} / {r['down'] * (r['rounds'] + r['hc_rounds']) / 1e6:5.1f} MB "
            f"{r['values']:12d} {r['pcs']:13d} {(str(r['hc_up']) + ' B') if r['hc_rounds'] else '-':>10s}"
        )
    if args.growth:
        print(f"\nmessage back to each site (server->site) by number of sites K, {args.preset} preset")
        print(f"  {'algorithm':23s} " + " ".join(f"{'K=' + k:>11s}" for k in args.growth.split(",")))
        for name in args.algos.split(","):
            sizes = []
            for k in args.growth.split(","):
                _, down = messages(name, args.preset, int(k), args.channels, args.classes)
                sizes.append(message_bytes(down))
            print(f"  {name:23s} " + " ".join(f"{s / 1e3:8.1f} kB" for s in sizes))


if __name__ == "__main__":
    main()
