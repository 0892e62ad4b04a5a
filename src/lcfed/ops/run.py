"""``python -m lcfed run``: export the job, run it in FLARE's simulator, evaluate, write ``results/``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lcfed.ops.jobs import JobSpec, export_job
from lcfed.ops.provisioning import RESOURCES_DEFAULT, extend_allow_list
from lcfed.runtime.data.layout import load_dataset_info, write_json_atomic
from lcfed.runtime.fl.site_config import DATA_ROOT_ENV, MODELS_ROOT_ENV

__all__ = [
    "RunFailed",
    "RoundProgress",
    "format_duration",
    "show_line",
    "job_folder_info",
    "simulate_job_folder",
    "prepare_workspace",
    "run_simulator",
    "simulator_checkpoints",
    "check_rounds",
    "judge_job",
    "failure_reason",
    "run_and_report",
]

# lines of the FLARE log worth showing on the console without --verbose
PROGRESS = re.compile(
    r"(site \S+ round \d+/\d+|round \d+: aggregated|Round \d+ started|site \S+: data from|site \S+: .*preset|"
    r"ERROR|Error|Exception|Traceback|^\s+File |raise |Finished FedAvg)"
)


# the server's line for each aggregated round (lcfed.runtime.fl.aggregator); the round index is 0-based
ROUND_DONE = re.compile(r"round (\d+): aggregated \d+ site\(s\).*?mean val dice (\S+?);")


def show_line(line: str) -> None:
    """Print and flush: progress piped into a file or ``tee`` must appear as it happens, not at exit."""
    print(line, flush=True)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``: short enough for a progress line."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


@dataclass
class RoundProgress:
    """Where a running simulation stands, from the server's aggregated-round lines.

    ``round`` is the number of rounds aggregated (1-based, counting rounds of a resumed run's earlier
    process too); the estimate of what is left extrapolates the mean time of the rounds this process ran.
    """

    rounds: int
    started: float = field(default_factory=time.perf_counter)
    round: int = 0
    mean_val_dice: float = float("nan")
    _first: int | None = field(default=None, init=False, repr=False)

    def update(self, line: str) -> bool:
        """Take one log line; True when it reported a newly aggregated round."""
        m = ROUND_DONE.search(line)
        if not m:
            return False
        idx = int(m.group(1))
        if self._first is None:
            self._first = idx
        self.round = idx + 1
        try:
            self.mean_val_dice = float(m.group(2))
        except ValueError:
            self.mean_val_dice = float("nan")
        return True

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def remaining(self) -> float:
        """Seconds left at the pace of the rounds seen so far (0 before the first round completes)."""
        done = self.round - (self._first or 0)
        return self.elapsed / done * max(self.rounds - self.round, 0) if done > 0 else 0.0

    def describe(self) -> str:
        dice = "n/a" if self.mean_val_dice != self.mean_val_dice else f"{self.mean_val_dice:.4f}"
        return (
            f"round {self.round}/{self.rounds}, mean val Dice {dice}, {format_duration(self.elapsed)} elapsed, "
            f"~{format_duration(self.remaining)} left"
        )


class RunFailed(RuntimeError):
    """The FL run did not train every round it was asked to (or FLARE reported a failure)."""


def _stream(cmd: list[str], env: dict[str, str], log_file: Path, handle: Callable[[str], None]) -> int:
    """Run ``cmd``, write its output to ``log_file`` and pass every line to ``handle``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log_file, "w") as log,
        subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        ) as proc,
    ):
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                handle(line)
            return proc.wait()
        except BaseException:
            # stop the whole simulator process group (server + clients) before re-raising
            import signal

            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
            raise


def simulator_checkpoints(
    models: str | os.PathLike, sites: list[str], run_name: str, which: str = "best.pt"
) -> dict[str, Path]:
    """Each site's personalized checkpoint in a run's models folder (``WS/models``)."""
    out = {}
    for s in sites:
        path = Path(models) / s / run_name / which
        if not path.is_file():
            raise RunFailed(f"site {s!r} wrote no personalized checkpoint ({path} is missing)")
        out[s] = path
    return out


def check_rounds(
    rounds_file: str | os.PathLike, expected_rounds: int, sites: list[str], min_sites: int = 1
) -> dict[str, Any]:
    """The server's round record must show every round aggregated from at least ``min_sites`` sites."""
    path = Path(rounds_file)
    if not path.is_file():
        raise RunFailed(f"the server aggregated no round ({path} is missing): the run did nothing")
    record = json.loads(path.read_text())
    rounds = record.get("rounds", [])
    if len(rounds) != expected_rounds:
        raise RunFailed(f"the server aggregated {len(rounds)} of {expected_rounds} rounds ({path})")
    empty = [r["round"] for r in rounds if not r.get("sites")]
    if empty:
        raise RunFailed(f"rounds {empty} aggregated zero results")
    short = [r["round"] for r in rounds if len(r["sites"]) < min_sites]
    if short:
        raise RunFailed(f"rounds {short} aggregated fewer than {min_sites} sites")
    return record


def judge_job(
    status: str, server_workspace: str | os.PathLike, job: dict[str, Any], show: Callable[[str], None]
) -> dict:
    """Decide whether a finished job trained what it should; raise :class:`RunFailed` if not.

    ``server_workspace`` is the server's downloaded job workspace (``app_server/lcfed_rounds.json`` and
    ``log.txt``). ``FINISHED:COMPLETED`` with every round aggregated passes. ``FINISHED:ABNORMAL`` or
    ``FINISHED:EXECUTION_EXCEPTION`` after a site dropped out passes only for a job whose ``min_clients`` is
    below its number of sites, when every round still aggregated at least ``min_clients`` sites; the sites
    that dropped out are reported. A failure
    carries the server's own reason, taken from its log.
    """
    server_workspace = Path(server_workspace)
    rounds_file = server_workspace / "app_server" / "lcfed_rounds.json"
    sites, needed = job["sites"], job.get("min_clients") or len(job["sites"])
    try:
        if status == "FINISHED:COMPLETED":
            return check_rounds(rounds_file, job["rounds"], sites, needed)
        if status in ("FINISHED:ABNORMAL", "FINISHED:EXECUTION_EXCEPTION") and needed < len(sites):
            # a site that died mid-run can leave FLARE with a half-received result at shutdown, which it
            # reports as either status; the server's round record decides whether the training happened
            record = check_rounds(rounds_file, job["rounds"], sites, needed)
            dropped = {s: [r["round"] for r in record["rounds"] if s not in r["sites"]] for s in sites}
            dropped = {s: rs for s, rs in dropped.items() if rs}
            if not dropped:
                raise RunFailed(f"job ended {status} although no site dropped out")
            show(
                f"job ended {status}: site(s) dropped out, missing from rounds {dropped}; every round had "
                f">= {needed}{_reason(server_workspace / 'log.txt', '; server: ')}"
            )
            return record
        raise RunFailed(f"job ended {status}")
    except RunFailed as e:
        why = _reason(server_workspace / "log.txt", "; server: ")
        raise RunFailed(f"{e}{why} (server log: {server_workspace / 'log.txt'})") from None


# the bundle's own refusals first (they name the site and what to do), then FLARE's and Python's generic errors
_OWN_FAILURE = re.compile(
    r"(?:BundleVersionMismatch|CheckpointMismatch|ContractViolation|DataError|ResumeError|ComponentNotAuthorized): "
    r"(.*?)(?:: Aborting the job!)?$"
)
_FAILURE = re.compile(r"Exception in \S+ run: (.*)$|(?:RuntimeError|ValueError): (.*)$")


def failure_reason(log_file: str | os.PathLike) -> str | None:
    """The first error a FLARE job log gives as the reason the run stopped (None if there is none)."""
    try:
        text = Path(log_file).read_text(errors="replace")
    except OSError:
        return None
    lines = text.splitlines()
    for pattern in (_OWN_FAILURE, _FAILURE):
        for line in lines:
            m = pattern.search(line)
            if m:
                return next(g for g in m.groups() if g is not None).strip()
    return None


def _reason(log_file: str | os.PathLike, prefix: str) -> str:
    """``prefix`` + the log's failure reason, or "" when the log gives none."""
    reason = failure_reason(log_file)
    return f"{prefix}{reason}" if reason else ""


RUN_ENTRIES = ("job", "simulator", "results", "simulator.log", "simulator.json", "models")


def prepare_workspace(workspace: str | os.PathLike, overwrite: bool, resume: bool = False) -> None:
    """Refuse to mix two runs in one workspace; with ``overwrite`` remove the previous run's entries.

    ``resume`` keeps the previous run's models and state (``models/``) and replaces the rest.
    """
    import shutil

    workspace = Path(workspace)
    if resume:
        if not (workspace / "models").is_dir():
            raise FileNotFoundError(f"nothing to resume in {workspace} (no models/ folder)")
        overwrite = True
    present = [workspace / e for e in RUN_ENTRIES if (workspace / e).exists() and not (resume and e == "models")]
    if present and not overwrite:
        raise FileExistsError(
            f"{workspace} already holds a run ({', '.join(p.name for p in present)}); "
            "choose another --workspace or pass --overwrite"
        )
    for p in present:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def job_folder_info(job_dir: str | os.PathLike) -> dict[str, Any]:
    """Name, site list, number of rounds and the sites a round needs (``min_clients``) of an exported job."""
    job_dir = Path(job_dir)
    workflow = json.loads((job_dir / "app" / "config" / "config_fed_server.json").read_text())["workflows"][0]["args"]
    name = json.loads((job_dir / "meta.json").read_text())["name"]
    sites = list(workflow["sites"])
    return {
        "name": name,
        "sites": sites,
        "rounds": int(workflow["num_rounds"]),
        "min_clients": int(workflow.get("min_clients") or 0) or len(sites),  # 0 in a job means every site
    }


def client_slots(parallel: int | None, n_sites: int) -> int:
    """Simulator clients run at a time: ``parallel`` (default: one per site), at most one per site.

    FLARE refuses more ("threads ... can not be larger than the number of clients").
    """
    if parallel is not None and parallel < 1:
        raise ValueError(f"--parallel {parallel}: at least one client at a time")
    return min(parallel or n_sites, n_sites)


def simulate_job_folder(
    job_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    workspace: str | os.PathLike,
    parallel: int | None = None,
    verbose: bool = False,
    show: Callable[[str], None] = show_line,
    on_round: Callable[[RoundProgress], None] | None = None,
) -> Path:
    """Run an exported job folder in FLARE's simulator (one client per site of the job) under ``workspace``.

    Without ``verbose`` the console gets the lines :data:`PROGRESS` matches, and each aggregated round as
    a :class:`RoundProgress` line (round r of R, last mean validation Dice, elapsed, estimate of what is
    left); ``on_round`` replaces that line (the benchmark adds which run it is). Returns the simulator
    workspace. Raises :class:`RunFailed` unless every round was aggregated.
    """
    job = job_folder_info(job_dir)
    workspace = Path(workspace).resolve()
    sim_ws = workspace / "simulator"
    # one simulator client per site at a time: with fewer, FLARE swaps clients in and out every round
    # (each swap restarts the site's process state, which the learner then reloads from its checkpoint)
    parallel = client_slots(parallel, len(job["sites"]))
    cmd = [
        sys.executable,
        "-m",
        "nvflare.private.fed.app.simulator.simulator",
        str(Path(job_dir).resolve()),
        "-w",
        str(sim_ws),
        "-c",
        ",".join(job["sites"]),
        "-t",
        str(parallel),
    ]
    # the simulator enforces FLARE's class allow-list like a provisioned site: allow the installed bundle
    # (FLARE keeps <workspace>/local across runs and copies it into every participant's local folder)
    extend_allow_list(sim_ws / "local" / RESOURCES_DEFAULT)
    env = dict(os.environ)
    env[DATA_ROOT_ENV] = str(Path(data_dir).resolve())
    # models and run state beside the simulator's workspace, which FLARE wipes at every start
    env[MODELS_ROOT_ENV] = str(workspace / "models")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    show(
        f"running {job['name']} in the FLARE simulator: {len(job['sites'])} sites, {job['rounds']} rounds, "
        f"{parallel} client(s) at a time; log: {workspace / 'simulator.log'}"
    )
    t0 = time.perf_counter()
    progress = RoundProgress(job["rounds"], started=t0)

    def handle(line: str) -> None:
        if progress.update(line):
            (on_round or (lambda p: show(f"[{job['name']}] {p.describe()}")))(progress)
            if not verbose:
                return  # the progress line stands for the server's raw one
        if verbose or PROGRESS.search(line):
            show(line.rstrip())

    rc = _stream(cmd, env, workspace / "simulator.log", handle)
    if rc != 0:
        raise RunFailed(
            f"the FLARE simulator exited with code {rc}{_reason(workspace / 'simulator.log', ': ')}; "
            f"see {workspace / 'simulator.log'}"
        )
    try:
        check_rounds(
            sim_ws / "server" / "simulate_job" / "app_server" / "lcfed_rounds.json", job["rounds"], job["sites"]
        )
    except RunFailed as e:
        why = _reason(workspace / "simulator.log", "; the first error: ")
        raise RunFailed(f"{e}{why}; see {workspace / 'simulator.log'}") from None
    show(f"simulation finished in {time.perf_counter() - t0:.0f} s")
    return sim_ws


def run_simulator(
    spec: JobSpec,
    data_dir: str | os.PathLike,
    workspace: str | os.PathLike,
    parallel: int | None = None,
    verbose: bool = False,
    show: Callable[[str], None] = show_line,
    on_round: Callable[[RoundProgress], None] | None = None,
) -> Path:
    """Export ``spec`` to ``workspace/job`` and run it with :func:`simulate_job_folder`."""
    workspace = Path(workspace).resolve()
    if not spec.num_threads:
        spec.num_threads = max(1, (os.cpu_count() or 1) // client_slots(parallel, len(spec.sites)))
    job_dir = export_job(spec, workspace / "job")
    write_json_atomic(
        workspace / "simulator.json",
        {
            "job_name": spec.job_name,
            "algorithm": spec.algorithm,
            "sites": spec.sites,
            "preset": spec.preset,
            "options": spec.options,
            "data": str(Path(data_dir).resolve()),
        },
    )
    return simulate_job_folder(job_dir, data_dir, workspace, parallel, verbose, show, on_round)


def run_and_report(
    algo: str,
    data_dir: str | os.PathLike,
    workspace: str | os.PathLike,
    preset: str = "demo",
    options: dict[str, Any] | None = None,
    parallel: int | None = None,
    verbose: bool = False,
    show: Callable[[str], None] = show_line,
    overwrite: bool = False,
    resume: bool = False,
    quantize: str = "",
) -> dict[str, Any]:
    """Run ``algo`` on every site of ``data_dir`` in the simulator and write ``workspace/results``.

    ``quantize`` names a message quantization type (see :class:`lcfed.ops.jobs.JobSpec`).
    A workspace that already holds a run is refused unless ``overwrite`` (which deletes that run's
    ``job/``, ``simulator/``, ``results/`` and log, nothing else).
    """
    from lcfed.ops.evaluation import evaluate_checkpoints, write_results
    from lcfed.ops.reports import results_table

    info = load_dataset_info(data_dir)
    prepare_workspace(workspace, overwrite, resume)
    spec = JobSpec(
        algorithm=algo,
        sites=list(info.sites),
        preset=preset,
        options=dict(options or {}),
        in_channels=info.channels,
        n_classes=info.n_classes,
        resume=resume,
        quantize=quantize,
    )
    sim_ws = run_simulator(spec, data_dir, workspace, parallel, verbose, show)
    models = Path(workspace).resolve() / "models"
    evaluation = evaluate_checkpoints(data_dir, simulator_checkpoints(models, spec.sites, spec.job_name))
    results = write_results(Path(workspace) / "results", evaluation, title=f"{algo} on {info.name}")
    show(f"\nTest metrics of each site's personalized model ({algo}, {info.name}):\n")
    show(results_table(results))
    show(
        f"\nresults: {Path(workspace) / 'results'} (metrics.json, summary.md, curves.png, overlays.png); "
        f"TensorBoard: tensorboard --logdir {sim_ws / 'server' / 'simulate_job' / 'tb_events'}"
    )
    return results
