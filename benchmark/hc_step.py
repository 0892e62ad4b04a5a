"""How far one Adam step moves Head Calibration's S* logits from its zero init, with and without HC's scaling.

HC's inputs are ``F * A + F`` with ``A_U = G * B`` and ``A_P = G * P`` (G the peak-1 Gaussian). The
paper's peak-1 ``G * P`` is up to the Gaussian's mass (~222) inside an object; the bundle divides it by
that mass (see :class:`lcfed.runtime.networks.HeadCalibration`). This script takes one batch of a site,
features F of the seeded demo U-Net, and P either from its head or, as a stand-in for a confident trained
head, the ground truth; then one Adam step of the Dice loss on S* from HC's zero init, for both scalings.

    python benchmark/hc_step.py --data data/demo
"""

from __future__ import annotations

import argparse

import torch

from lcfed.runtime.algorithms import get_algorithm
from lcfed.runtime.config import make_config
from lcfed.runtime.data.layout import load_dataset_info
from lcfed.runtime.data.pipeline import load_site
from lcfed.runtime.losses import soft_dice_loss
from lcfed.runtime.networks import (
    HeadCalibration,
    disagreement_map,
    gaussian_mass,
    pick_peaks,
    separable_gaussian_filter,
)
from lcfed.runtime.trainer import SiteTrainer


def paper_inputs(feature: torch.Tensor, prob: torch.Tensor, peaks: torch.Tensor) -> torch.Tensor:
    """HC's inputs with the paper's literal scaling: A_U = G * B and A_P = G * P, both with the peak-1 G."""
    a_u, a_p = separable_gaussian_filter(peaks), separable_gaussian_filter(prob)
    parts = []
    for c in range(prob.shape[1]):
        parts += [feature * a_u[:, c : c + 1] + feature, feature * a_p[:, c : c + 1] + feature]
    return torch.cat(parts, dim=1)


def logit_step(hc: HeadCalibration, inputs: torch.Tensor, label: torch.Tensor, lr: float) -> torch.Tensor:
    """|change of the S* logits| per pixel after one Adam step (lr) from HC's zero init on these inputs."""
    hc.reset_parameters()
    opt = torch.optim.Adam(hc.conv.parameters(), lr=lr, betas=(0.9, 0.999))
    before = hc.conv(inputs).detach()
    loss = soft_dice_loss(torch.sigmoid(hc.conv(inputs)), label)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return (hc.conv(inputs).detach() - before).abs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--site", default=None, help="default: the first site")
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = make_config(args.preset, amp=False)
    sites = list(load_dataset_info(args.data).sites)
    site = args.site or sites[0]
    trainer = SiteTrainer(get_algorithm("lcfed"), config, load_site(args.data, site, config.size), sites, site, "cpu")
    train = trainer.data.splits["training"]
    image, label = train.images[: args.batch], train.labels[: args.batch]
    model = trainer.model
    with torch.no_grad():
        feature = model.features(image, trainer.ctx.site_index).feature
        head_prob = torch.sigmoid(model.head(feature))
    hc = model.hc
    mass = gaussian_mass()
    print(
        f"site {site}, preset {args.preset}: F mean {feature.mean():.3f}, max {feature.max():.3f}; G's mass {mass:.1f}"
    )
    for source, prob in (("P = seeded head", head_prob), ("P = ground truth", label.float())):
        # isolated disagreement peaks, as a trained bank gives them: where P departs most from the truth
        peaks = pick_peaks(disagreement_map(head_prob, label.float()[None]))
        for name, inputs in (
            ("peak-1 G*P (paper)", paper_inputs(feature, prob, peaks)),
            ("G*P / mass (bundle)", hc.calibrated_features(feature, prob, peaks)),
        ):
            step = logit_step(hc, inputs, label, args.lr)
            print(
                f"{source:17s} {name:20s} inputs max {inputs.abs().max():7.1f}; one Adam step (lr {args.lr:g}) "
                f"moves the S* logits by mean {step.mean():.3f}, max {step.max():.3f}"
            )


if __name__ == "__main__":
    main()
