"""A site killed mid-run, in POC mode (real processes, loopback): fail clearly, or go on, then rejoin.

- Every site required (default): the round stops waiting after ``round_timeout`` and the run fails,
  naming the missing site.
- ``min_clients`` below the number of sites: the run goes on without the site; its head stays in the
  bank (stale, as documented). The site is restarted and the run resumed: the site continues from its
  own personalized checkpoint and trains again.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest

from lcfed.ops.deploy import processes_using
from lcfed.ops.jobs import JobSpec, export_job
from lcfed.ops.poc import PocWorkspace
from lcfed.ops.run import RunFailed

pytestmark = pytest.mark.e2e
SITES = ["site-a", "site-b", "site-c"]


def _quiet(_: str) -> None:
    pass


def _kill_site_when(poc: PocWorkspace, pattern: str, site: str, earlier: set, timeout: float = 300.0) -> None:
    """Kill every process of ``site`` once the new job's server log shows ``pattern`` (a real crash)."""
    deadline = time.time() + timeout
    server = poc.kit_dir / "server"
    while time.time() < deadline:
        for log in server.glob("*/log.txt"):
            if log.parent.name in earlier:
                continue
            if re.search(pattern, log.read_text(errors="replace")):
                for pid in processes_using(poc.kit_dir / site):
                    os.kill(pid, signal.SIGKILL)
                return
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} never appeared in the server log")


def _start_site(poc: PocWorkspace, site: str) -> None:
    subprocess.run(["nvflare", "poc", "start", "-p", site], env=poc.env(), check=True, capture_output=True, timeout=120)


def _submit_in_background(poc, data, job_dir):
    """poc.submit_and_report in a thread, so the test can kill a site meanwhile; also the earlier job folders."""
    import threading

    earlier = {p.name for p in (poc.kit_dir / "server").iterdir()}
    outcome: dict = {"earlier": earlier}

    def target():
        try:
            outcome["results"] = poc.submit_and_report(data, job_dir=job_dir, timeout=600)
        except Exception as e:  # the test inspects it
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def test_a_killed_site_fails_the_run_or_is_tolerated_and_rejoins(tiny_data, tmp_path):
    poc = PocWorkspace(tmp_path / "poc", home=tmp_path / "home", show=_quiet)
    jobs = tmp_path / "jobs"
    common = dict(sites=SITES, preset="tiny", wait_time_after_min_received=3, round_timeout=30)
    # network rounds only (hc_rounds 0): the round counts below are the jobs' FLARE rounds
    strict = export_job(JobSpec(name="strict", options={"rounds": 6, "hc_rounds": 0}, **common), jobs)
    tolerant = export_job(
        JobSpec(name="tolerant", options={"rounds": 6, "hc_rounds": 0}, min_clients=2, **common), jobs / "t6"
    )
    # the resumed job waits for late sites (a site's first round after a restart includes its start-up)
    patient = {**common, "wait_time_after_min_received": 90}
    resumed = export_job(
        JobSpec(name="tolerant", options={"rounds": 8, "hc_rounds": 0}, min_clients=2, resume=True, **patient),
        jobs / "t8",
    )
    poc.prepare(tiny_data)
    try:
        poc.start()
        # 1. every site required: the run fails and says which site is missing
        thread, outcome = _submit_in_background(poc, tiny_data, strict)
        _kill_site_when(poc, r"round 1: aggregated", "site-c", outcome["earlier"])
        thread.join(600)
        assert isinstance(outcome.get("error"), RunFailed), outcome
        assert "EXECUTION_EXCEPTION" in str(outcome["error"])
        assert "the job needs 3 (min_clients); missing: ['site-c']" in str(outcome["error"])  # the server's reason

        # 2. min_clients=2 of 3: the run goes on without site-c; its head stays in the bank
        _start_site(poc, "site-c")
        time.sleep(5)
        thread, outcome = _submit_in_background(poc, tiny_data, tolerant)
        _kill_site_when(poc, r"round 1: aggregated 3 site", "site-c", outcome["earlier"])
        thread.join(600)
        assert "results" in outcome, outcome.get("error")
        record = json.loads((poc.kit_dir / "server/lcfed_models/tolerant/lcfed_rounds.json").read_text())
        assert [sorted(r["sites"]) for r in record["rounds"][:2]] == [SITES, SITES]
        late = record["rounds"][3:]
        assert late and all(sorted(r["sites"]) == ["site-a", "site-b"] for r in late)
        assert all(r["n_bank_keys"] == 2 * len(SITES) for r in late)  # site-c's last head kept (stale)

        # 3. site-c restarts; the run is resumed for 2 more rounds and site-c trains from its own checkpoint
        _start_site(poc, "site-c")
        time.sleep(5)
        ckpt = poc.kit_dir / "site-c" / "lcfed_models" / "tolerant" / "last.pt"
        rounds_before = json.loads((ckpt.parent / "history.json").read_text())[-1]["round"]
        results = poc.submit_and_report(tiny_data, job_dir=resumed, timeout=600)
        assert sorted(results["sites"]) == SITES
        record = json.loads((poc.kit_dir / "server/lcfed_models/tolerant/lcfed_rounds.json").read_text())
        assert [r["round"] for r in record["rounds"]] == list(range(8))
        assert [sorted(r["sites"]) for r in record["rounds"][6:]] == [SITES, SITES]
        history = json.loads((ckpt.parent / "history.json").read_text())
        assert [h["round"] for h in history if h["round"] <= rounds_before] == list(range(rounds_before + 1))
        assert [h["round"] for h in history][-2:] == [6, 7]  # it kept its own past and trained again
        site_log = "".join(p.read_text() for p in (poc.kit_dir / "site-c").glob("*/log.txt"))
        assert "resumed from" in site_log and "rejoins at round 7" in site_log
    finally:
        poc.stop()
    assert processes_using(poc.poc_dir) == []


def test_a_terminated_run_stops_the_simulator_it_started(tiny_data2, tmp_path):
    """SIGTERM to `python -m lcfed run` (a scheduler's kill) ends the run and every FLARE process it started."""
    import sys

    ws = tmp_path / "run"
    cmd = [sys.executable, "-m", "lcfed", "run", "--algo", "lcfed", "--data", tiny_data2, "--workspace", str(ws)]
    cmd += ["--preset", "tiny", "--rounds", "30"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    left: list[int] = []
    try:
        deadline = time.time() + 120
        # wait until the simulator's clients train (their processes work under the run's workspace)
        while time.time() < deadline and len(processes_using(ws)) < 3:
            time.sleep(1)
        assert len(processes_using(ws)) >= 3, "the simulator never started"
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=90)
        deadline = time.time() + 60
        while time.time() < deadline and processes_using(ws):
            time.sleep(1)
        left = processes_using(ws)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in processes_using(ws):  # never leave them running, even when the test fails
            os.kill(pid, signal.SIGKILL)
    assert rc == 143, f"exit status {rc}: SIGTERM did not run the command's clean-up"
    assert not left, f"processes left after SIGTERM: {left}"
