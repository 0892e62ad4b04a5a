"""FLARE jobs built with the Job API and exported as plain job folders.

The same exported folder runs in the simulator, in POC mode and on provisioned kits: it carries the
``lcfed`` package in ``app/custom`` (kits only accept jobs with their own code, see the README) and
no machine's paths (each site finds its data through site-local configuration).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import make_config

__all__ = ["JobSpec", "build_job", "export_job", "DEMO_SITES", "COMMITTED_JOBS", "export_committed_jobs"]

PACKAGE_DIR = Path(__file__).resolve().parent
ANALYTICS_EVENT = "analytix_log_stats"
DEMO_SITES = ["site-a", "site-b", "site-c", "site-d"]


@dataclass
class JobSpec:
    """Everything a job folder fixes.

    Args:
        algorithm: registry name.
        sites: ordered site list (FLARE client names).
        preset: preset name.
        options: preset overrides (``rounds``, ``iterations`` ...).
        in_channels: image channels.
        n_classes: output classes.
        name: job name (default: the algorithm name).
        weighting: server averaging, "uniform" or "samples".
        drop_stale_heads: forget the head of a site that misses a round.
        min_clients: clients FLARE waits for before it starts the job (default: all sites).
        num_threads: torch threads per site process (0: torch's default).
        task_request_interval: seconds a client waits before asking the server for its next task.
        resume: sites continue from their last checkpoint of an earlier job with the same name.
    """

    algorithm: str = "lcfed"
    sites: list[str] = field(default_factory=lambda: list(DEMO_SITES))
    preset: str = "demo"
    options: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 1
    n_classes: int = 2
    name: str = ""
    weighting: str = "uniform"
    drop_stale_heads: bool = False
    min_clients: int = 0
    num_threads: int = 0
    task_request_interval: float = 0.5
    resume: bool = False

    @property
    def job_name(self) -> str:
        return self.name or self.algorithm

    @property
    def rounds(self) -> int:
        return make_config(self.preset, **self.options).rounds


def _clean_package_copy(dest_root: Path) -> Path:
    """Copy the lcfed package without caches; returns the folder that holds ``lcfed/``."""
    target = dest_root / "custom"
    shutil.copytree(PACKAGE_DIR, target / "lcfed", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    return target


def build_job(spec: JobSpec, custom_dir: str | Path):
    """A FedJob for ``spec``. ``custom_dir`` is a folder holding the ``lcfed`` package to ship."""
    from nvflare.app_common.executors.learner_executor import LearnerExecutor
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.defs import FilterType

    from .algorithms import get_algorithm
    from .fl.aggregator import HeadBankAggregator
    from .fl.controller import SiteListFedAvg
    from .fl.learner import LCFedLearner
    from .fl.persistor import GlobalStatePersistor
    from .fl.traffic import TrafficMeter

    get_algorithm(spec.algorithm)  # fail early on an unknown name (before FLARE imports anything)
    make_config(spec.preset, **spec.options)  # and on an unknown preset/option
    sites = list(spec.sites)
    if len(set(sites)) != len(sites) or not sites:
        raise ValueError(f"the site list must name each site once: {sites}")
    model_args = dict(
        algorithm=spec.algorithm,
        sites=sites,
        preset=spec.preset,
        options=dict(spec.options) or None,
        in_channels=spec.in_channels,
        n_classes=spec.n_classes,
    )
    job = FedJob(name=spec.job_name, min_clients=spec.min_clients or len(sites))
    job.set_app_packages(["lcfed"])  # shipped whole below, not module by module
    job.to_server(GlobalStatePersistor(**model_args), id="persistor")
    aggregator = HeadBankAggregator(**model_args, weighting=spec.weighting, drop_stale_heads=spec.drop_stale_heads)
    shares_nothing = get_algorithm(spec.algorithm).contract.shares_nothing
    controller = SiteListFedAvg(
        sites=sites,
        num_clients=len(sites),
        num_rounds=spec.rounds,
        persistor_id="persistor",
        aggregator=aggregator,
        # Local training has no global model at all
        allow_empty_global_weights=shares_nothing,
    )
    job.to_server(controller, id="controller")
    job.to_server(TBAnalyticsReceiver(events=["fed." + ANALYTICS_EVENT]), id="tb_receiver")
    # what actually crosses the wire, per site and round (bytes of the serialized task and result)
    job.to_server(TrafficMeter("to_site"), tasks=["train"], filter_type=FilterType.TASK_DATA)
    job.to_server(TrafficMeter("from_site"), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    job.to_server({"server": {"task_request_interval": spec.task_request_interval}})

    learner = LCFedLearner(**model_args, num_threads=spec.num_threads, run_name=spec.job_name, resume=spec.resume)
    job.to_clients(learner, id="learner")
    job.to_clients(LearnerExecutor(learner_id="learner"), tasks=["train", "validate", "submit_model"])
    job.to_clients(TBWriter(event_type=ANALYTICS_EVENT), id="tb_writer")
    job.to_clients(ConvertToFedEvent(events_to_convert=[ANALYTICS_EVENT], fed_event_prefix="fed."), id="to_fed_event")
    job.to_server(str(custom_dir))
    job.to_clients(str(custom_dir))
    return job


def export_job(spec: JobSpec, out_dir: str | Path) -> Path:
    """Export ``spec`` as ``out_dir/<job name>/`` (meta.json + app/config + app/custom/lcfed)."""
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        custom = _clean_package_copy(Path(tmp))
        build_job(spec, custom).export_job(str(out_dir))
    return out_dir / spec.job_name


# the job folders committed under jobs/: the embedded 4-site demo set, demo preset
COMMITTED_JOBS = ("lcfed",)


def export_committed_jobs(out_dir: str | Path) -> list[Path]:
    """(Re-)export every committed job; a test checks that the committed folders equal this export."""
    return [export_job(JobSpec(algorithm=name), out_dir) for name in COMMITTED_JOBS]
