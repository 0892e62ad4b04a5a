"""Provisioned startup kits: provision, configure a site, and a loopback dry run of a whole federation.

Hospitals run their kit's ``startup/start.sh``; this module adds what the bundle needs on top of FLARE:
the site's data configuration (``local/lcfed_site.json``) and, for IT teams, a dry run that provisions
``provisioning/project.yml`` into a temporary folder, starts the server and every site on loopback,
submits the job through the admin console as the project admin, waits, checks that every site wrote
its personalized checkpoints, shuts everything down and makes sure no process is left.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from lcfed.ops.deploy import (
    admin_env,
    connected_clients,
    download_result,
    follow_job,
    processes_using,
    shared_host_env,
    stop_pids,
    submit_with_console,
    wait_for_sites,
)
from lcfed.ops.run import PROGRESS, RunFailed, job_folder_info, judge_job
from lcfed.runtime.data.layout import write_json_atomic
from lcfed.runtime.fl.site_config import MODELS_DIR, SITE_CONFIG_FILE

__all__ = ["provision", "write_site_config", "Federation", "project_admin"]


def project_admin(project_yml: str | os.PathLike) -> str:
    """The first participant with the project_admin role."""
    project = yaml.safe_load(Path(project_yml).read_text())
    for p in project.get("participants", []):
        if p.get("type") == "admin" and p.get("role") == "project_admin":
            return p["name"]
    raise ValueError(f"{project_yml} names no project_admin")


def provision(project_yml: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``nvflare provision``; returns the folder holding one startup kit per participant."""
    out = Path(out).resolve()
    proc = subprocess.run(
        ["nvflare", "provision", "-p", str(project_yml), "-w", str(out), "--force"],
        capture_output=True,
        text=True,
        env=admin_env(),
        timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"nvflare provision failed: {(proc.stdout + proc.stderr)[-1500:]}")
    name = yaml.safe_load(Path(project_yml).read_text())["name"]
    kits = sorted((out / name).glob("prod_*"))
    if not kits:
        raise RuntimeError(f"nvflare provision wrote no kits under {out / name}")
    return kits[-1]


def write_site_config(kit: str | os.PathLike, data_root: str | os.PathLike, models_dir: str | None = None) -> Path:
    """The site-local configuration that tells the learner where this hospital's data is."""
    cfg: dict[str, Any] = {"data_root": str(Path(data_root).resolve())}
    if models_dir:
        cfg["models_dir"] = str(models_dir)
    path = Path(kit) / "local" / SITE_CONFIG_FILE
    write_json_atomic(path, cfg)
    return path


class Federation:
    """A provisioned federation run on this machine (loopback), for dry runs and tests.

    Args:
        kits: the ``prod_NN`` folder from :func:`provision`.
        sites: client names to start.
        admin: the admin that submits (its kit is ``kits/<admin>``).
        show: progress output.
    """

    def __init__(self, kits: str | os.PathLike, sites: list[str], admin: str, show: Callable[[str], None] = print):
        self.kits = Path(kits)
        self.sites = sites
        self.admin = admin
        self.show = show

    def kit(self, name: str) -> Path:
        return self.kits / name

    def start(self, timeout: float = 300.0) -> list[int]:
        """Run ``startup/start.sh`` of the server, then of every site; wait until all clients are connected.

        The sites share this machine, so each gets a share of its cores (a real site uses its own).
        """
        env = admin_env(shared_host_env(len(self.sites) + 1))
        for name in ["server", *self.sites]:
            subprocess.run(
                ["bash", str(self.kit(name) / "startup" / "start.sh")],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=60,
                check=True,
            )
        try:
            wait_for_sites(self.admin, self.kit(self.admin), self.sites, timeout, self.show)
        except TimeoutError as e:
            raise RuntimeError(f"the federation did not come up: {e}") from None
        pids = self.pids()
        self.show(f"federation up: server and {len(self.sites)} sites ({len(pids)} processes)")
        return pids

    def connected_clients(self) -> list[str]:
        return connected_clients(self.admin, self.kit(self.admin)) or []

    def pids(self) -> list[int]:
        return processes_using(self.kits)

    def submit(self, job_dir: str | os.PathLike, admin: str | None = None) -> str:
        """Submit through the admin console of ``admin`` (default: the federation's admin)."""
        return submit_with_console(job_dir, self.kit(admin or self.admin))

    def wait(self, job_id: str, timeout: float = 1800.0) -> dict[str, Any]:
        """Wait for the job, showing each round as the server aggregates it."""
        log = self.kit("server") / job_id / "log.txt"
        return follow_job(self.admin, self.kit(self.admin), job_id, log, PROGRESS, self.show, timeout)

    def checkpoints(self, job_name: str) -> dict[str, Path]:
        return {s: self.kit(s) / MODELS_DIR / job_name / "best.pt" for s in self.sites}

    def shutdown(self, grace: float = 60.0) -> list[int]:
        """Shut the system down through the admin API, then stop by pid whatever is left."""
        from nvflare.fuel.flare_api.flare_api import new_secure_session

        pids = self.pids()
        try:
            sess = new_secure_session(self.admin, str(self.kit(self.admin)), timeout=10)
            try:
                # FLARE refuses to shut down under a running job: abort those first
                for job in sess.list_jobs():
                    if str(job.get("status", "")).startswith("RUNNING"):
                        try:
                            sess.abort_job(job["job_id"])
                        except Exception as e:  # a job the server lists but no longer runs: nothing to abort
                            self.show(f"abort {job['job_id']}: {e}")
                sess.shutdown_system()
            finally:
                sess.close()
        except Exception as e:  # the server may already be gone; the pids below still get stopped
            self.show(f"admin shutdown: {e}")
        signalled = stop_pids(self.pids() or pids, grace=grace)
        self.show(f"federation shut down{f' (signalled {signalled})' if signalled else ''}")
        return signalled

    def dry_run(
        self, job_dir: str | os.PathLike, timeout: float = 1800.0, start_timeout: float = 300.0
    ) -> dict[str, Any]:
        """Start, then :meth:`run_job`; always shut down."""
        try:
            self.start(start_timeout)
            return self.run_job(job_dir, timeout)
        finally:
            self.shutdown()

    def run_job(self, job_dir: str | os.PathLike, timeout: float = 1800.0) -> dict[str, Any]:
        """Submit as the admin through the console, wait, check the rounds and every site's checkpoints."""
        job_dir = Path(job_dir)
        job_name = json.loads((job_dir / "meta.json").read_text())["name"]
        job_id = self.submit(job_dir)
        self.show(f"submitted {job_name} as job {job_id} through the admin console of {self.admin}")
        meta = self.wait(job_id, timeout)
        status = str(meta.get("status"))
        result = download_result(self.admin, self.kit(self.admin), job_id, self.kits.parent / "downloads")
        job = job_folder_info(job_dir)
        try:
            record = judge_job(status, result / "workspace", job, self.show)
        except RunFailed as e:
            raise RunFailed(f"job {job_id}: {e}") from None
        missing = [s for s, p in self.checkpoints(job_name).items() if not p.is_file()]
        if missing:
            raise RunFailed(f"site(s) {missing} wrote no personalized checkpoint")
        self.show(f"job {job_id}: {status}, {len(record['rounds'])} rounds, checkpoints at every site")
        return {"job_id": job_id, "status": status, "record": record, "result": str(result)}
