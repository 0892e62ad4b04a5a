"""Communication per site and round at any preset, without running a federation.

    python benchmark/communication.py [--preset paper] [--sites 4] [--channels 3] [--classes 2]

For each algorithm the site's outgoing message is built exactly as the learner builds it (the contract's
shared keys plus the banked head, a WEIGHTS DXO as a FLARE Shareable) and serialized with FLARE's fobs,
which is what :mod:`lcfed.runtime.fl.traffic` measures on a real run. The message back to a site is the shared
model plus the head bank (one head per site). ``lcfed bench`` measures the same on the wire at the demo
preset; this script shows what the paper preset costs. For staged HC the last column is a site's message
in an HC round (network frozen: the banked head only, see ``Algorithm.head_only``).
"""

from __future__ import annotations

import argparse

import numpy as np


def message_bytes(data: dict[str, np.ndarray]) -> int:
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.app_common.decomposers import common_decomposers
    from nvflare.fuel.utils import fobs

    common_decomposers.register()  # numpy arrays, as in every FLARE process
    return len(fobs.dumps(DXO(data_kind=DataKind.WEIGHTS, data=data).to_shareable()))


def main() -> None:
    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.algorithms.base import ModelSpec
    from lcfed.runtime.config import make_config
    from lcfed.runtime.contract import bank_key

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--sites", type=int, default=4)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--algos", default="fedavg,fedrep,lcfed,lcfed-private-embedding,lcfed-pn")
    args = parser.parse_args()

    cfg = make_config(args.preset)
    spec = ModelSpec(args.channels, args.classes, args.sites, cfg.width)
    rows = []
    for name in args.algos.split(","):
        algo = get_algorithm(name)
        state = {k: v.detach().float().numpy() for k, v in algo.build_model(spec).state_dict().items()}
        up = {k: v for k, v in state.items() if algo.contract.is_shared(k) or algo.contract.is_banked(k)}
        down = {k: v for k, v in state.items() if algo.contract.is_shared(k)}
        for site in range(args.sites):
            for k in state:
                if algo.contract.is_banked(k):
                    down[bank_key(f"site-{site}", k)] = state[k]
        pcs = sum(v.size for k, v in up.items() if k.startswith("pcs."))
        # the first HC round of the staged schedule, if the algorithm has one
        hc_round = cfg.rounds
        hc_up = None
        if algo.total_rounds(cfg) > cfg.rounds and algo.head_only(cfg, hc_round):
            hc_up = message_bytes({k: v for k, v in up.items() if algo.contract.is_banked(k)})
        rows.append((name, message_bytes(up), message_bytes(down), sum(v.size for v in up.values()), pcs, hc_up))
    base_up, base_down = rows[0][1], rows[0][2]
    print(
        f"preset {args.preset} (width {cfg.width}), {args.sites} sites, {args.channels} channel(s), "
        f"{args.classes} class(es); serialized FLARE messages per site and round"
    )
    print(
        f"  {'algorithm':23s} {'site->server':>14s} {'vs ' + rows[0][0]:>10s} {'server->site':>14s} "
        f"{'vs ' + rows[0][0]:>10s} {'values sent':>12s} {'of which PCS':>13s} {'HC round site->server':>22s}"
    )
    for name, up, down, n_values, pcs, hc_up in rows:
        hc = "-" if hc_up is None else f"{hc_up} B ({hc_up / up:.4%})"
        print(
            f"  {name:23s} {up / 1e3:11.1f} kB {up / base_up - 1:+10.2%} {down / 1e3:11.1f} kB "
            f"{down / base_down - 1:+10.2%} {n_values:12d} {pcs:13d} {hc:>22s}"
        )


if __name__ == "__main__":
    main()
