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

from .algorithms import BASELINES, LCFED_VARIANTS
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
        min_clients: sites that must be connected to start, and results a round needs (default: all
            sites). Below the number of sites, the run goes on when a site drops out.
        wait_time_after_min_received: seconds a round waits for late sites once ``min_clients`` answered.
        round_timeout: seconds after which a round stops waiting for sites (a site that died unnoticed);
            with fewer than ``min_clients`` results the run then fails.
        num_threads: torch threads per site process (0: torch's default).
        task_request_interval: seconds a client waits before asking the server for its next task.
        resume: continue the run saved under this job name (server: shared model, head bank, round;
            sites: their personalized state) up to ``rounds`` in total.
        send_diffs: sites send differences to the model they received instead of weights.
        percentile_privacy: add FLARE's ``PercentilePrivacy`` filter on every site's result with these
            arguments (e.g. ``{"percentile": 10, "gamma": 0.01}``); implies ``send_diffs``.
        exclude_vars: add FLARE's ``ExcludeVars`` filter with this regular expression (shared keys only;
            the server then averages each shared key over the sites that sent it).
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
    wait_time_after_min_received: int = 10
    round_timeout: int = 3600
    num_threads: int = 0
    task_request_interval: float = 0.5
    resume: bool = False
    send_diffs: bool = False
    percentile_privacy: dict[str, float] | None = None
    exclude_vars: str = ""

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


def _excluded_keys(spec: JobSpec) -> list[str]:
    """The shared keys ``spec.exclude_vars`` removes; refuses a pattern that would touch a banked head."""
    if not spec.exclude_vars:
        return []
    import re

    from .fl.reference import reference_model

    algo, model, _ = reference_model(
        spec.algorithm, spec.sites, spec.preset, spec.options or None, spec.in_channels, spec.n_classes
    )
    keys = [k for k in algo.contract.outgoing_keys(model.state_dict()) if re.search(spec.exclude_vars, k)]
    banked = [k for k in keys if algo.contract.is_banked(k)]
    if banked:
        raise ValueError(f"exclude_vars {spec.exclude_vars!r} would remove {banked}, which the head bank needs")
    if not keys:
        raise ValueError(f"exclude_vars {spec.exclude_vars!r} matches no parameter that a site sends")
    return keys


def build_job(spec: JobSpec, custom_dir: str | Path):
    """A FedJob for ``spec``. ``custom_dir`` is a folder holding the ``lcfed`` package to ship."""
    from nvflare.app_common.executors.learner_executor import LearnerExecutor
    from nvflare.app_common.filters.exclude_vars import ExcludeVars
    from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
    from nvflare.app_common.widgets.convert_to_fed_event import ConvertToFedEvent
    from nvflare.app_opt.tracking.tb.tb_receiver import TBAnalyticsReceiver
    from nvflare.app_opt.tracking.tb.tb_writer import TBWriter
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.defs import FilterType

    from .algorithms import get_algorithm
    from .fl.aggregator import HeadBankAggregator
    from .fl.audit import OutgoingAudit
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
    if spec.min_clients < 0 or spec.min_clients > len(sites):
        raise ValueError(
            f"min_clients must be between 1 and the number of sites ({len(sites)}), got {spec.min_clients}"
        )
    excluded = _excluded_keys(spec)
    run = dict(run_name=spec.job_name, resume=spec.resume)
    job = FedJob(name=spec.job_name, min_clients=spec.min_clients or len(sites))
    job.set_app_packages(["lcfed"])  # shipped whole below, not module by module
    job.to_server(GlobalStatePersistor(**model_args, **run), id="persistor")
    aggregator = HeadBankAggregator(
        **model_args,
        **run,
        weighting=spec.weighting,
        drop_stale_heads=spec.drop_stale_heads,
        allow_missing_shared=bool(spec.exclude_vars),
        min_clients=spec.min_clients,
    )
    shares_nothing = get_algorithm(spec.algorithm).contract.shares_nothing
    controller = SiteListFedAvg(
        sites=sites,
        min_clients=spec.min_clients,
        wait_time_after_min_received=spec.wait_time_after_min_received,
        round_timeout=spec.round_timeout,
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

    send_diffs = spec.send_diffs or bool(spec.percentile_privacy)
    learner = LCFedLearner(**model_args, **run, num_threads=spec.num_threads, send_diffs=send_diffs)
    job.to_clients(learner, id="learner")
    job.to_clients(LearnerExecutor(learner_id="learner"), tasks=["train", "validate", "submit_model"])
    # privacy filters first, then the audit that checks and logs what actually leaves the site
    if excluded:
        # the exact names, not the pattern: FLARE's job export cannot serialize ExcludeVars' compiled regex
        job.to_clients(ExcludeVars(exclude_vars=excluded), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    if spec.percentile_privacy:
        job.to_clients(
            PercentilePrivacy(**spec.percentile_privacy), tasks=["train"], filter_type=FilterType.TASK_RESULT
        )
    # one filter chain per task (FLARE refuses two chains for the same task)
    for task in ("train", "validate"):
        audit = OutgoingAudit(**model_args, run_name=spec.job_name)
        job.to_clients(audit, tasks=[task], filter_type=FilterType.TASK_RESULT)
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


# the job folders committed under jobs/: one per algorithm (LC-Fed, its variants, every baseline), for the
# embedded 4-site demo set at the demo preset (a test keeps this equal to the algorithm registry)
COMMITTED_JOBS = LCFED_VARIANTS + BASELINES


def export_committed_jobs(out_dir: str | Path) -> list[Path]:
    """(Re-)export every committed job; a test checks that the committed folders equal this export."""
    return [export_job(JobSpec(algorithm=name), out_dir) for name in COMMITTED_JOBS]
