"""Talking to a running FLARE system: submit jobs as an admin, follow them, fetch results, stop processes.

Two submission paths, both with a provisioned admin startup kit (POC mode prepares one):

- the FLARE Python API: ``new_secure_session`` -> ``submit_job`` -> ``monitor_job`` -> ``download_job_result``;
- the admin console: the job folder is copied into the kit's ``transfer/`` folder and ``submit_job NAME``
  is typed into ``startup/fl_admin.sh``.

Processes started here are found and stopped by pid (:func:`processes_using`, :func:`stop_pids`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "SubmissionRefused",
    "admin_env",
    "submit_with_api",
    "submit_with_console",
    "wait_for_job",
    "download_result",
    "processes_using",
    "stop_pids",
    "tail_new_lines",
    "connected_clients",
    "shared_host_env",
    "wait_for_sites",
    "follow_job",
]

TERMINAL = ("FINISHED", "ABORTED", "FAILED")


class SubmissionRefused(RuntimeError):
    """The server refused a job (e.g. the admin's role may not submit jobs with custom code)."""


def admin_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for FLARE's scripts: this interpreter's folder first on PATH (their ``python3``)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def _session(username: str, admin_kit: str | os.PathLike, timeout: float = 30.0):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    return new_secure_session(username, str(admin_kit), timeout=timeout)


def submit_with_api(job_dir: str | os.PathLike, username: str, admin_kit: str | os.PathLike) -> str:
    """Submit a job folder through the FLARE Python API; returns the job id."""
    sess = _session(username, admin_kit)
    try:
        return sess.submit_job(str(job_dir))
    except Exception as e:  # the API raises its own error types; keep the server's words
        raise SubmissionRefused(f"{username} could not submit {job_dir}: {e}") from e
    finally:
        sess.close()


JOB_ID = re.compile(r"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def submit_with_console(job_dir: str | os.PathLike, admin_kit: str | os.PathLike, timeout: float = 120.0) -> str:
    """Submit through the admin console: copy into ``transfer/``, type ``submit_job NAME``; returns the job id."""
    job_dir, admin_kit = Path(job_dir), Path(admin_kit)
    transfer = admin_kit / "transfer"
    transfer.mkdir(exist_ok=True)
    target = transfer / job_dir.name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(job_dir, target)
    # provisioned kits ask for the user name (uid_source "user_input"); POC kits take it from the certificate
    admin_cfg = json.loads((admin_kit / "startup" / "fed_admin.json").read_text())["admin"]
    login = f"{admin_cfg['username']}\n" if admin_cfg.get("uid_source") == "user_input" else ""
    proc = subprocess.run(
        ["bash", str(admin_kit / "startup" / "fl_admin.sh")],
        input=f"{login}submit_job {job_dir.name}\nbye\n",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=admin_env(),
    )
    out = proc.stdout + proc.stderr
    found = [line for line in out.splitlines() if "submit" in line.lower() or "error" in line.lower()]
    match = JOB_ID.search("\n".join(line for line in out.splitlines() if "ubmitted" in line))
    if not match:
        raise SubmissionRefused(
            f"the admin console did not accept {job_dir.name}: " + (" | ".join(found[-4:]) or out[-800:])
        )
    return match.group(1)


def shared_host_env(n_processes: int) -> dict[str, str]:
    """Thread limits for FLARE processes that share one host (POC, a loopback dry run).

    Each site's job process would otherwise run torch with as many threads as the host has cores, and
    several of them oversubscribe the CPU many times over; a real site has its own machine and no limit.
    """
    threads = str(max(1, (os.cpu_count() or 1) // max(1, n_processes)))
    return {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def connected_clients(username: str, admin_kit: str | os.PathLike) -> list[str] | None:
    """Names of the clients connected to the server (None while the server does not answer)."""
    try:
        sess = _session(username, admin_kit, timeout=10)
    except Exception:
        return None
    try:
        return [c.name for c in sess.get_system_info().client_info]
    except Exception:
        return None
    finally:
        sess.close()


def wait_for_sites(
    username: str,
    admin_kit: str | os.PathLike,
    sites: list[str],
    timeout: float,
    show: Callable[[str], None] = print,
    every: float = 10.0,
) -> list[str]:
    """Wait until every site is connected, saying who has connected so far; raise ``TimeoutError`` naming the rest."""
    t0 = time.time()
    last_shown, connected = -every, None
    while True:
        connected = connected_clients(username, admin_kit)
        if connected is not None and set(sites) <= set(connected):
            show(f"all {len(sites)} sites connected after {time.time() - t0:.0f} s")
            return connected
        elapsed = time.time() - t0
        if elapsed > timeout:
            missing = sorted(set(sites) - set(connected or []))
            state = "the server does not answer" if connected is None else f"connected: {sorted(connected)}"
            raise TimeoutError(
                f"after {timeout:.0f} s {state}; still missing {missing}. A busy machine starts FLARE slowly: "
                "give it more time with --start-timeout, or stop other work and try again"
            )
        if elapsed - last_shown >= every:
            last_shown = elapsed
            state = (
                "server starting" if connected is None else f"{len(connected)}/{len(sites)} sites {sorted(connected)}"
            )
            show(f"waiting for the federation: {state} ({elapsed:.0f} of {timeout:.0f} s)")
        time.sleep(2.0)


def follow_job(
    username: str,
    admin_kit: str | os.PathLike,
    job_id: str,
    server_log: str | os.PathLike,
    pattern: re.Pattern[str],
    show: Callable[[str], None] = print,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """:func:`wait_for_job`, showing the server log's lines that match ``pattern`` (rounds) as they come."""
    offset = 0

    def on_poll(meta: dict[str, Any]) -> None:
        nonlocal offset
        lines, offset = tail_new_lines(server_log, offset)
        for line in lines:
            if pattern.search(line):
                show(re.sub(r"^.*? - INFO - \[[^\]]*\] - ", "", line))

    return wait_for_job(username, admin_kit, job_id, timeout=timeout, on_poll=on_poll)


def wait_for_job(
    username: str,
    admin_kit: str | os.PathLike,
    job_id: str,
    timeout: float = 3600.0,
    poll: float = 3.0,
    on_poll: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Poll the job's meta through the FLARE API until its status is terminal (``FINISHED:*``)."""
    sess = _session(username, admin_kit)
    try:
        deadline = time.time() + timeout
        while True:
            meta = sess.get_job_meta(job_id)
            if on_poll is not None:
                on_poll(meta)
            status = str(meta.get("status", ""))
            if status.startswith(TERMINAL):
                return meta
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} did not finish within {timeout:.0f} s (status {status})")
            time.sleep(poll)
    finally:
        sess.close()


def download_result(username: str, admin_kit: str | os.PathLike, job_id: str, dest: str | os.PathLike) -> Path:
    """Download the server-side job result (server workspace of the job) into ``dest``."""
    Path(dest).mkdir(parents=True, exist_ok=True)
    sess = _session(username, admin_kit)
    try:
        return Path(sess.download_job_result(job_id, str(dest)))
    finally:
        sess.close()


def processes_using(path: str | os.PathLike) -> list[int]:
    """Pids of processes whose command line or working directory lies under ``path`` (Linux /proc)."""
    needle = str(Path(path).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except (OSError, PermissionError):
            continue
        if needle in cmd or cwd == needle or cwd.startswith(needle + os.sep):
            found.append(int(entry.name))
    return sorted(found)


def stop_pids(pids: list[int], grace: float = 30.0) -> list[int]:
    """Wait up to ``grace`` seconds for ``pids`` to exit, then SIGTERM, then SIGKILL; returns those signalled."""

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie is gone for our purposes
            return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
        except OSError:
            return False

    deadline = time.time() + grace
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.5)
    signalled = []
    for sig in (signal.SIGTERM, signal.SIGKILL):
        left = [p for p in pids if alive(p)]
        for p in left:
            try:
                os.kill(p, sig)
                signalled.append(p)
            except ProcessLookupError:
                pass
        t_end = time.time() + 5
        while time.time() < t_end and any(alive(p) for p in left):
            time.sleep(0.2)
    return sorted(set(signalled))


def tail_new_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """Lines appended to ``path`` since byte ``offset``; returns them and the new offset."""
    if not path.is_file():
        return [], offset
    with open(path, errors="replace") as fh:
        fh.seek(offset)
        data = fh.read()
        return data.splitlines(), fh.tell()
