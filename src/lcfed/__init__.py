"""LC-Fed: personalized federated segmentation via local calibration (ECCV 2022), for NVIDIA FLARE."""

__version__ = "0.2.0"
