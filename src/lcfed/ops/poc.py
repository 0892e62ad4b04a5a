"""POC mode on one workstation: one FLARE client per site of a data set, named like the sites.

``python -m lcfed poc run --data DIR`` prepares a POC, starts it, submits the job (FLARE Python API),
waits, downloads the server's result, computes ``results/`` like the simulator run and stops the POC.
The separate steps (``prepare``, ``start``, ``submit``, ``status``, ``stop``, ``clean``) keep a POC
running across jobs. Each site finds its data through ``<site>/local/lcfed_site.json`` (written by
``prepare``), never through the job.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lcfed.ops.deploy import (
    admin_env,
    download_result,
    follow_job,
    processes_using,
    shared_host_env,
    stop_pids,
    submit_with_api,
    submit_with_console,
    wait_for_sites,
)
from lcfed.ops.jobs import JobSpec, export_job
from lcfed.ops.provisioning import configure_local_dir
from lcfed.ops.run import PROGRESS, RunFailed, job_folder_info, judge_job
from lcfed.runtime.data.layout import load_dataset_info, write_json_atomic
from lcfed.runtime.fl.site_config import MODELS_DIR, SITE_CONFIG_FILE

__all__ = ["PocWorkspace", "POC_ADMIN"]

POC_ADMIN = "admin@nvidia.com"  # the project admin that `nvflare poc prepare` provisions
CLIENT_OUTCOME_WAIT_ENV = "NVFLARE_CLIENT_OUTCOME_WAIT_TIMEOUT"  # FLARE's client_outcome_wait_timeout


class PocWorkspace:
    """A POC under ``root``: FLARE's POC workspace in ``root/poc``, jobs, downloads and results beside it.

    Args:
        root: folder of this POC.
        home: run FLARE's commands with this HOME (``nvflare poc prepare`` writes ``~/.nvflare/config.conf``);
            default: the user's own.
        show: where progress goes.
    """

    def __init__(
        self, root: str | os.PathLike, home: str | os.PathLike | None = None, show: Callable[[str], None] = print
    ):
        self.root = Path(root).resolve()
        self.poc_dir = self.root / "poc"
        self.home = Path(home).resolve() if home else None
        self.show = show

    # -- environment -------------------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        # every site of the POC shares this machine's cores
        extra = {"NVFLARE_POC_WORKSPACE": str(self.poc_dir), **shared_host_env(len(self.sites()) or 1)}
        # after a site died, FLARE waits this long for the dead site's outcome before it publishes the job's
        # final status (default 900 s); a POC on one workstation needs no such patience
        extra[CLIENT_OUTCOME_WAIT_ENV] = os.environ.get(CLIENT_OUTCOME_WAIT_ENV, "60")
        if self.home:
            extra["HOME"] = str(self.home)
        return admin_env(extra)

    def _nvflare(self, *args: str, timeout: float = 300.0, check: bool = True) -> str:
        cmd = ["nvflare", *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}): {out[-1500:]}")
        return out

    @property
    def kit_dir(self) -> Path:
        """The provisioned startup kits (server, sites, admins) inside the POC workspace."""
        for server in sorted(self.poc_dir.glob("*/prod_*/server")):
            return server.parent
        raise FileNotFoundError(f"no POC prepared in {self.poc_dir} (run `python -m lcfed poc prepare`)")

    @property
    def admin_kit(self) -> Path:
        return self.kit_dir / POC_ADMIN

    def sites(self) -> list[str]:
        cfg = self.root / "poc_sites.json"
        return json.loads(cfg.read_text())["sites"] if cfg.is_file() else []

    # -- steps -------------------------------------------------------------------------------------
    def prepare(self, data_dir: str | os.PathLike) -> list[str]:
        """``nvflare poc prepare`` with one client per site of ``data_dir``; writes each site's data config."""
        info = load_dataset_info(data_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        if self.home:
            self.home.mkdir(parents=True, exist_ok=True)
        if self.running():
            raise RuntimeError(f"a POC is running in {self.poc_dir}; stop it first (`python -m lcfed poc stop`)")
        self._nvflare("poc", "prepare", "-c", *info.sites, "--force")
        # the POC enforces FLARE's class allow-list like a provisioned kit: allow the installed bundle there,
        # and give BYOC to no role (the same two edits the provisioning builder makes)
        for participant in ["server", *info.sites]:
            configure_local_dir(self.kit_dir / participant / "local", server=participant == "server")
        data_root = str(Path(data_dir).resolve())
        for site in info.sites:
            write_json_atomic(self.kit_dir / site / "local" / SITE_CONFIG_FILE, {"data_root": data_root})
        write_json_atomic(self.root / "poc_sites.json", {"sites": info.sites, "data": data_root})
        self.show(f"POC prepared in {self.poc_dir} with sites {info.sites}; data: {data_root}")
        return info.sites

    def running(self) -> list[int]:
        return processes_using(self.poc_dir) if self.poc_dir.exists() else []

    def start(self, timeout: float = 300.0) -> list[int]:
        """Start server and clients (not the admin console), showing who has connected; returns their pids.

        A POC whose sites do not all connect within ``timeout`` seconds is stopped again, and the error says
        which sites were missing.
        """
        sites = self.sites()
        # FLARE's own wait prints nothing and ends in a timeout without saying who is missing: wait here instead
        self._nvflare("poc", "start", "--no-wait", timeout=120)
        try:
            wait_for_sites(POC_ADMIN, self.admin_kit, sites, timeout, self.show)
        except TimeoutError as e:
            self.stop()
            raise RuntimeError(f"the POC did not come up: {e}") from None
        pids = self.running()
        self.show(f"POC started ({len(pids)} processes)")
        return pids

    def export(
        self, algo: str, preset: str, options: dict[str, Any], data_dir: str | os.PathLike, quantize: str = ""
    ) -> JobSpec:
        """The job for ``data_dir``'s sites, exported to ``root/jobs/<name>``."""
        info = load_dataset_info(data_dir)
        spec = JobSpec(
            algorithm=algo,
            sites=list(info.sites),
            preset=preset,
            options=dict(options),
            in_channels=info.channels,
            n_classes=info.n_classes,
            quantize=quantize,
        )
        export_job(spec, self.root / "jobs")
        return spec

    def submit(self, job_dir: str | os.PathLike, console: bool = False) -> str:
        job_id = (
            submit_with_console(job_dir, self.admin_kit)
            if console
            else submit_with_api(job_dir, POC_ADMIN, self.admin_kit)
        )
        self.show(f"submitted {Path(job_dir).name} as job {job_id} ({'admin console' if console else 'FLARE API'})")
        return job_id

    def follow(self, job_id: str, timeout: float = 3600.0) -> dict[str, Any]:
        """Wait for the job, showing the server's round lines as they come."""
        log = self.kit_dir / "server" / job_id / "log.txt"
        return follow_job(POC_ADMIN, self.admin_kit, job_id, log, PROGRESS, self.show, timeout)

    def download(self, job_id: str) -> Path:
        return download_result(POC_ADMIN, self.admin_kit, job_id, self.root / "downloads")

    def checkpoints(self, job_name: str, sites: list[str]) -> dict[str, Path]:
        out = {}
        for s in sites:
            path = self.kit_dir / s / MODELS_DIR / job_name / "best.pt"
            if not path.is_file():
                raise RunFailed(f"site {s!r} has no personalized checkpoint at {path}")
            out[s] = path
        return out

    def status(self) -> str:
        pids = self.running()
        lines = [f"POC in {self.poc_dir}: {'running' if pids else 'stopped'} ({len(pids)} processes)"]
        if pids:
            from nvflare.fuel.flare_api.flare_api import new_secure_session

            sess = new_secure_session(POC_ADMIN, str(self.admin_kit), timeout=20)
            try:
                info = sess.get_system_info()
                lines.append(f"clients: {[c.name for c in info.client_info]}")
                for job in sess.list_jobs():
                    lines.append(f"job {job.get('job_id')} {job.get('name', '')}: {job.get('status')}")
            finally:
                sess.close()
        return "\n".join(lines)

    def stop(self, grace: float = 40.0) -> list[int]:
        """``nvflare poc stop``, then stop by pid whatever is left; returns the pids that had to be signalled."""
        pids = self.running()
        if not pids:
            return []
        try:
            self._nvflare("poc", "stop", timeout=120, check=False)
        except subprocess.TimeoutExpired:
            pass
        # site wrapper loops outlive `poc stop` by about 20 s: wait, then signal by pid
        left = stop_pids(self.running() or pids, grace=grace)
        self.show(f"POC stopped{f' (signalled {left})' if left else ''}")
        return left

    def clean(self) -> None:
        if self.running():
            raise RuntimeError("stop the POC before cleaning it")
        shutil.rmtree(self.poc_dir, ignore_errors=True)
        for name in ("jobs", "downloads", "results", "poc_sites.json"):
            p = self.root / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        self.show(f"POC workspace {self.root} cleaned")

    # -- the one-command run -----------------------------------------------------------------------
    def submit_and_report(
        self,
        data_dir: str | os.PathLike,
        algo: str = "lcfed",
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        console: bool = False,
        timeout: float = 3600.0,
        job_dir: str | os.PathLike | None = None,
        quantize: str = "",
    ) -> dict[str, Any]:
        """On a running POC: submit ``job_dir`` (default: export the job for ``data_dir``), wait, download,
        check every round ran, evaluate every site's personalized checkpoint."""
        from lcfed.ops.evaluation import evaluate_checkpoints, write_results
        from lcfed.ops.reports import results_table

        info = load_dataset_info(data_dir)
        if job_dir is None:
            spec = self.export(algo, preset, options or {}, data_dir, quantize)
            job_dir = self.root / "jobs" / spec.job_name
        job = job_folder_info(job_dir)
        job_id = self.submit(job_dir, console=console)
        meta = self.follow(job_id, timeout)
        status = str(meta.get("status"))
        downloaded = self.download(job_id)
        try:
            judge_job(status, downloaded / "workspace", job, self.show)
        except RunFailed as e:
            raise RunFailed(f"job {job_id}: {e}; site logs: {self.kit_dir}/<site>/log.txt") from None
        evaluation = evaluate_checkpoints(data_dir, self.checkpoints(job["name"], job["sites"]))
        results = write_results(self.root / "results", evaluation, title=f"{job['name']} on {info.name} (POC)")
        results["job_id"] = job_id
        self.show("\nTest metrics of each site's personalized model:\n")
        self.show(results_table(results))
        self.show(f"\nresults: {self.root / 'results'}; server result: {downloaded}")
        return results

    def run(
        self,
        data_dir: str | os.PathLike,
        algo: str = "lcfed",
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        console: bool = False,
        timeout: float = 3600.0,
        keep_running: bool = False,
        job_dir: str | os.PathLike | None = None,
        start_timeout: float = 300.0,
        quantize: str = "",
    ) -> dict[str, Any]:
        """Prepare, start, submit, wait, download, evaluate, stop (always, unless ``keep_running``)."""
        t0 = time.perf_counter()
        self.prepare(data_dir)
        try:
            self.start(start_timeout)
            results = self.submit_and_report(data_dir, algo, preset, options, console, timeout, job_dir, quantize)
        finally:
            if not keep_running:
                self.stop()
        self.show(f"POC run finished in {time.perf_counter() - t0:.0f} s")
        return results
