"""Local training cost: one LC-Fed iteration against one plain U-Net (FedAvg) iteration, same size.

    python benchmark/iteration_cost.py --data data/demo [--site site-a] [--preset demo] [--repeats 5]

Every variant runs on the same batches, interleaved one iteration at a time (this machine is shared and
noisy), and the ratios are taken from the medians. Then LC-Fed's own parts are timed alone to show where the extra
time goes: the contrastive term, the disagreement map (all banked heads, peak picking) and the Head
Calibration step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timer(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main() -> None:
    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.config import make_config
    from lcfed.runtime.contract import bank_key
    from lcfed.runtime.data.layout import load_dataset_info
    from lcfed.runtime.data.pipeline import load_site
    from lcfed.runtime.losses import soft_dice_loss
    from lcfed.runtime.networks import bank_predictions, contrastive_site_loss, disagreement_map, pick_peaks
    from lcfed.runtime.trainer import SiteTrainer

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--site", default=None)
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10, help="iterations per timed block")
    args = parser.parse_args()

    info = load_dataset_info(args.data)
    site = args.site or info.sites[0]
    cfg = make_config(args.preset)
    data = load_site(args.data, site, cfg.size, splits=("training",))
    trainers = {
        name: SiteTrainer(get_algorithm(name), cfg, data, info.sites, site) for name in ("fedavg", "lcfed-joint")
    }
    lc = trainers["lcfed-joint"]
    # a full head bank (random heads of the other sites) so the disagreement map does real work
    bank = {}
    for other in info.sites:
        w = torch.randn_like(lc.model.head.weight) * 0.3
        bank[bank_key(other, "head.weight")] = w.numpy()
        bank[bank_key(other, "head.bias")] = torch.zeros_like(lc.model.head.bias).numpy()
    lc.ctx.head_bank.update(bank)
    train = data.splits["training"]
    idx = list(range(min(cfg.batch_size, len(train))))
    image, label = train.images[idx].to(lc.device), train.labels[idx].to(lc.device)
    shared_it = cfg.personal_iterations  # an iteration of the body phase
    variants = {
        "plain U-Net (FedAvg) iteration": lambda: trainers["fedavg"].algorithm.train_step(
            trainers["fedavg"].ctx, image, label, 0, 0
        ),
        "LC-Fed body iteration (Dice + contrastive)": lambda: _lcfed_step(lc, image, label, shared_it, hc=False),
        "LC-Fed body iteration + joint HC step": lambda: lc.algorithm.train_step(lc.ctx, image, label, shared_it, 0),
        "LC-Fed head-only iteration + joint HC step": lambda: lc.algorithm.train_step(lc.ctx, image, label, 0, 0),
    }
    for fn in variants.values():  # warm-up
        fn()
    # interleaved one iteration at a time, so load from other processes hits every variant alike
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats * args.iterations):
        for name, fn in variants.items():
            times[name].append(_timer(fn, 1))
    base = statistics.median(times["plain U-Net (FedAvg) iteration"])
    print(
        f"site {site}, preset {args.preset} (width {cfg.width}, {cfg.size}x{cfg.size}, batch {cfg.batch_size}), "
        f"device {lc.device}, torch threads {torch.get_num_threads()}; medians of {args.repeats * args.iterations} "
        "iterations, the variants interleaved"
    )
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:45s} {med * 1e3:8.1f} ms   x{med / base:.2f}")
    # a round's schedule: personal_iterations head-only + the rest body iterations
    p, n = cfg.personal_iterations, cfg.iterations
    joint = (
        p * statistics.median(times["LC-Fed head-only iteration + joint HC step"])
        + (n - p) * statistics.median(times["LC-Fed body iteration + joint HC step"])
    ) / n
    staged = (n - p) * statistics.median(times["LC-Fed body iteration (Dice + contrastive)"]) / n  # + cheap head-only
    print(
        f"  per iteration over a round ({p} head-only + {n - p} body): joint HC x{joint / base:.2f}; "
        f"staged network rounds <= x{staged / base:.2f} + head-only iterations"
    )

    # where the extra time goes
    model = lc.model
    feats = model.features(image, lc.ctx.site_index)

    def contrastive() -> None:
        model.zero_grad(set_to_none=True)
        contrastive_site_loss(model.pcs, feats.bottleneck, lc.ctx.site_index).backward()

    with torch.no_grad():
        feature = feats.feature.detach()
        prob = torch.sigmoid(model.head(feature))
    others = lc.ctx.head_bank.others(site, lc.device)

    def disagreement() -> None:
        with torch.no_grad():
            pick_peaks(disagreement_map(prob, bank_predictions(feature, *others)))

    peaks = pick_peaks(disagreement_map(prob, bank_predictions(feature, *others)))

    def head_calibration() -> None:
        model.zero_grad(set_to_none=True)
        soft_dice_loss(model.hc(feature, prob, peaks), label).backward()

    parts = {
        "contrastive term (fwd+bwd)": contrastive,
        "disagreement map + peaks": disagreement,
        "Head Calibration (fwd+bwd)": head_calibration,
    }
    for fn in parts.values():
        fn()
    part_times = {
        k: statistics.median([_timer(fn, args.iterations) for _ in range(args.repeats)]) for k, fn in parts.items()
    }
    print("  LC-Fed's own parts, timed alone:")
    for name, t in part_times.items():
        print(f"    {name:43s} {t * 1e3:8.1f} ms   ({t / base:.0%} of a plain iteration)")


def _lcfed_step(trainer, image, label, iteration, hc: bool):
    """One body-phase iteration without the HC step (what a staged network round does)."""
    algo = trainer.algorithm
    saved = algo.hc_schedule
    algo.hc_schedule = "joint" if hc else "staged"
    try:
        return algo.train_step(trainer.ctx, image, label, iteration, 0)
    finally:
        algo.hc_schedule = saved


if __name__ == "__main__":
    main()
