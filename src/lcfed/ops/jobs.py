"""FLARE jobs built with the Job API and exported as configuration-only job folders.

A job folder holds ``meta.json`` and ``app/config/*.json``: which installed classes to run, with which
arguments, and the bundle version it was exported with. It carries no code: every site (and the
server) runs the ``lcfed`` bundle installed in its own Python environment, allowed by the class
allow-list that :mod:`lcfed.ops.provisioning` writes into each kit. The same folder runs in the
simulator, in POC mode and on provisioned kits, and names no machine's paths (each site finds its data
through site-local configuration). :func:`pack_job` makes a BYOC copy for federations that prefer
shipping code with the job: it adds only the runtime subpackage, never the operations side.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lcfed
from lcfed.runtime.algorithms import BASELINES, LCFED_VARIANTS, get_algorithm
from lcfed.runtime.config import make_config

__all__ = [
    "JobSpec",
    "build_job",
    "export_job",
    "pack_job",
    "DEMO_SITES",
    "COMMITTED_JOBS",
    "export_committed_jobs",
    "job_class_paths",
]

PACKAGE_DIR = Path(lcfed.__file__).resolve().parent
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
        quantize: quantize every training message in both directions with this type of FLARE's message
            quantization (``float16``, ``adaquant``; ``blockwise8``, ``float4``, ``normfloat4`` need
            bitsandbytes on a GPU, see :mod:`lcfed.runtime.fl.quantization`); "" sends float32.
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
    quantize: str = ""

    @property
    def job_name(self) -> str:
        return self.name or self.algorithm

    @property
    def rounds(self) -> int:
        """FLARE rounds of the job: ``rounds`` of network training, plus the HC rounds of staged HC."""
        return get_algorithm(self.algorithm).total_rounds(make_config(self.preset, **self.options))


def _excluded_keys(spec: JobSpec) -> list[str]:
    """The shared keys ``spec.exclude_vars`` removes; refuses a pattern that would touch a banked head."""
    if not spec.exclude_vars:
        return []
    import re

    from lcfed.runtime.fl.reference import reference_model

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


def build_job(spec: JobSpec):
    """A configuration-only FedJob for ``spec``: the installed bundle's classes, pinned to its version."""
    from nvflare.app_common.executors.learner_executor import LearnerExecutor
    from nvflare.app_common.filters.exclude_vars import ExcludeVars
    from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy
    from nvflare.job_config.api import FedJob
    from nvflare.job_config.defs import FilterType

    from lcfed.runtime.algorithms import get_algorithm
    from lcfed.runtime.fl.aggregator import HeadBankAggregator
    from lcfed.runtime.fl.audit import OutgoingAudit
    from lcfed.runtime.fl.controller import SiteListFedAvg
    from lcfed.runtime.fl.learner import LCFedLearner
    from lcfed.runtime.fl.persistor import GlobalStatePersistor
    from lcfed.runtime.fl.quantization import MessageDequantizer, MessageQuantizer, check_quantization_type
    from lcfed.runtime.fl.traffic import TrafficMeter

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
    # the learner and the persistor refuse a job exported with another bundle version than the installed one
    pinned = dict(bundle_version=lcfed.__version__)
    if spec.min_clients < 0 or spec.min_clients > len(sites):
        raise ValueError(
            f"min_clients must be between 1 and the number of sites ({len(sites)}), got {spec.min_clients}"
        )
    excluded = _excluded_keys(spec)
    # refused here when this machine cannot run the type (8 and 4 bits need bitsandbytes on a GPU)
    quantize = check_quantization_type(spec.quantize) if spec.quantize else ""
    run = dict(run_name=spec.job_name, resume=spec.resume)
    job = FedJob(name=spec.job_name, min_clients=spec.min_clients or len(sites))
    job.set_app_packages(["lcfed"])  # installed at every site: FLARE copies none of its code into the job
    job.to_server(GlobalStatePersistor(**model_args, **run, **pinned), id="persistor")
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
    # what actually crosses the wire, per site and round (bytes of the serialized task and result): with
    # quantization the meter sizes the task after the server quantized it and the result before the server
    # dequantizes it. The final validate task (once per run) goes unquantized.
    if quantize:
        job.to_server(MessageQuantizer(quantize), tasks=["train"], filter_type=FilterType.TASK_DATA)
    job.to_server(TrafficMeter("to_site"), tasks=["train"], filter_type=FilterType.TASK_DATA)
    job.to_server(TrafficMeter("from_site"), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    if quantize:
        job.to_server(MessageDequantizer(), tasks=["train"], filter_type=FilterType.TASK_RESULT)
    job.to_server({"server": {"task_request_interval": spec.task_request_interval}})

    send_diffs = spec.send_diffs or bool(spec.percentile_privacy)
    learner = LCFedLearner(**model_args, **run, **pinned, num_threads=spec.num_threads, send_diffs=send_diffs)
    job.to_clients(learner, id="learner")
    job.to_clients(LearnerExecutor(learner_id="learner"), tasks=["train", "validate", "submit_model"])
    if quantize:
        # the global model and the head bank back in float32 before the learner merges them
        job.to_clients(MessageDequantizer(), tasks=["train"], filter_type=FilterType.TASK_DATA)
    # one result chain for every task whose result leaves the site (FLARE refuses overlapping chains): privacy
    # filters first, then quantization, then the audit that checks and logs what actually leaves. FLARE's DXO
    # filters skip data kinds they do not handle, so the validate task's metrics pass these filters untouched.
    results = ["train", "validate"]
    if excluded:
        # the exact names, not the pattern: FLARE's job export cannot serialize ExcludeVars' compiled regex
        job.to_clients(ExcludeVars(exclude_vars=excluded), tasks=results, filter_type=FilterType.TASK_RESULT)
    if spec.percentile_privacy:
        job.to_clients(PercentilePrivacy(**spec.percentile_privacy), tasks=results, filter_type=FilterType.TASK_RESULT)
    if quantize:
        job.to_clients(MessageQuantizer(quantize), tasks=results, filter_type=FilterType.TASK_RESULT)
    audit = OutgoingAudit(**model_args, run_name=spec.job_name)
    job.to_clients(audit, tasks=results, filter_type=FilterType.TASK_RESULT)
    # TensorBoard: each site writes its own events into its models folder (the learner), the server writes what
    # it received (the aggregator); no analytics stream leaves a site beside the audited task results
    return job


def export_job(spec: JobSpec, out_dir: str | Path) -> Path:
    """Export ``spec`` as ``out_dir/<job name>/`` (meta.json + app/config, no code)."""
    out_dir = Path(out_dir)
    build_job(spec).export_job(str(out_dir))
    job_dir = out_dir / spec.job_name
    custom = job_dir / "app" / "custom"
    if custom.exists():  # FLARE writes an empty custom folder for some component types; nothing belongs there
        if any(custom.rglob("*.py")):
            raise RuntimeError(f"the job export put code into {custom}; a configuration-only job carries none")
        shutil.rmtree(custom)
    for cfg in [job_dir / "meta.json", *job_dir.glob("*/config/*.json")]:
        cfg.write_text(compact_json(_sorted_tasks(json.loads(cfg.read_text()))) + "\n")
    return job_dir


def compact_json(value: Any, indent: int = 0, width: int = 110) -> str:
    """JSON with nested objects indented and short lists or objects kept on one line (the same data as FLARE's)."""
    flat = json.dumps(value)
    if not isinstance(value, (dict, list)) or not value or len(flat) + indent <= width and _is_shallow(value):
        return flat
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {compact_json(v, indent + 2, width)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{compact_json(v, indent + 2, width)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


def _sorted_tasks(node: Any) -> Any:
    """Task lists sorted: FLARE writes a filter chain's tasks from a set, in an order that varies per process."""
    if isinstance(node, dict):
        return {k: sorted(v) if k == "tasks" and isinstance(v, list) else _sorted_tasks(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_sorted_tasks(v) for v in node]
    return node


def _is_shallow(value: Any) -> bool:
    """True for a list or object nesting no more than one further small list or object."""
    children = value.values() if isinstance(value, dict) else value
    return all(
        not isinstance(c, (dict, list))
        or all(not isinstance(g, (dict, list)) for g in (c.values() if isinstance(c, dict) else c))
        for c in children
    )


# what a site executes: the runtime subpackage and the package's own __init__ (its version)
RUNTIME_FILES = ("__init__.py", "runtime")


def pack_job(job_dir: str | Path, out_dir: str | Path) -> Path:
    """A BYOC copy of a configuration-only job: ``out_dir/<job>/`` with ``app/custom/lcfed`` (runtime only).

    For federations that prefer shipping the code with each job over installing the bundle at every site.
    Only what a site or the server executes travels (networks, algorithms, trainer, data pipeline, FLARE
    adapters); the CLI, benchmark, POC/production tooling, importers and reports stay behind. Submitting
    it needs the BYOC right, which the kits of ``provisioning/project.yml`` give to no role.
    """
    job_dir, out_dir = Path(job_dir), Path(out_dir)
    meta = job_dir / "meta.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{job_dir} is not a job folder (no meta.json)")
    apps = [d for d in job_dir.iterdir() if (d / "config").is_dir()]
    if not apps:
        raise FileNotFoundError(f"{job_dir} has no app folder with a config/ inside")
    target = out_dir / job_dir.name
    if target.resolve() == job_dir.resolve():
        raise ValueError(f"pack into another folder than the job's own ({job_dir})")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(job_dir, target, ignore=shutil.ignore_patterns("custom"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for app in apps:
        package = target / app.name / "custom" / "lcfed"
        package.mkdir(parents=True)
        for name in RUNTIME_FILES:
            src = PACKAGE_DIR / name
            if src.is_dir():
                shutil.copytree(src, package / name, ignore=ignore)
            else:
                shutil.copy2(src, package / name)
    return target


def job_class_paths(job_dir: str | Path) -> set[str]:
    """Every component class path a job folder's configs name (what a site's allow-list must admit)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key in ("path", "class_path"):
                if isinstance(node.get(key), str):
                    found.add(node[key])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for cfg in Path(job_dir).glob("*/config/*.json"):
        walk(json.loads(cfg.read_text()))
    return found


# the job folders committed under jobs/: one per algorithm (LC-Fed, its variants, every baseline), for the
# embedded 4-site demo set at the demo preset (a test keeps this equal to the algorithm registry)
COMMITTED_JOBS = LCFED_VARIANTS + BASELINES


def export_committed_jobs(out_dir: str | Path) -> list[Path]:
    """(Re-)export every committed job; a test checks that the committed folders equal this export."""
    return [export_job(JobSpec(algorithm=name), out_dir) for name in COMMITTED_JOBS]
