"""Networks: U-Net body, PCS, Head Calibration."""

from .calibration import (
    HeadCalibration,
    bank_predictions,
    calibration_maps,
    disagreement_map,
    fp32,
    gaussian_1d,
    gaussian_2d,
    gaussian_mass,
    pick_peaks,
    separable_gaussian_filter,
)
from .pcs import PersonalizedChannelSelection, contrastive_site_loss
from .segnet import Features, LCFedUNet

__all__ = [
    "Features",
    "HeadCalibration",
    "LCFedUNet",
    "PersonalizedChannelSelection",
    "bank_predictions",
    "calibration_maps",
    "contrastive_site_loss",
    "disagreement_map",
    "fp32",
    "gaussian_1d",
    "gaussian_2d",
    "gaussian_mass",
    "pick_peaks",
    "separable_gaussian_filter",
]
