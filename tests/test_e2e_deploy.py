"""One exported job folder, three ways to run it: simulator, POC mode, provisioned kits on loopback.

Short (tiny preset, 2 rounds, 4 sites of 32x32 demo data) but real: FLARE processes are started,
the job is submitted the way users submit it, and every process started here is stopped by pid.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lcfed.ops.data.demo import build_demo
from lcfed.ops.deploy import SubmissionRefused, processes_using
from lcfed.ops.jobs import JobSpec, export_job
from lcfed.ops.poc import PocWorkspace
from lcfed.ops.production import Federation, project_admin, provision, write_site_config
from lcfed.ops.run import job_folder_info, simulate_job_folder

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
SITES = ["site-a", "site-b", "site-c", "site-d"]


@pytest.fixture(scope="module")
def data4(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data4") / "demo4"
    build_demo(out, n_sites=4, size=32, verbose=False)
    return out


@pytest.fixture(scope="module")
def job4(tmp_path_factory) -> Path:
    """The one job folder all three tests run: LC-Fed for the project's four sites, tiny preset, 2 rounds.

    ``hc_rounds`` 0: no staged HC rounds after the 2 network rounds (the simulator test covers those).
    """
    spec = JobSpec(preset="tiny", options={"rounds": 2, "hc_rounds": 0}, name="lcfed-tiny")
    return export_job(spec, tmp_path_factory.mktemp("jobs"))


def _quiet(_: str) -> None:
    pass


def test_job_folder_runs_in_the_simulator(job4, data4, tmp_path):
    assert job_folder_info(job4) == {"name": "lcfed-tiny", "sites": SITES, "rounds": 2, "min_clients": 4}
    simulate_job_folder(job4, data4, tmp_path, show=_quiet)
    for s in SITES:
        assert (tmp_path / "models" / s / "lcfed-tiny" / "best.pt").is_file()


def test_poc_end_to_end_and_nothing_left_running(job4, data4, tmp_path):
    poc = PocWorkspace(tmp_path / "poc", home=tmp_path / "home", show=_quiet)
    try:
        results = poc.run(data4, job_dir=job4, timeout=900)
    finally:
        poc.stop()
    assert sorted(results["sites"]) == SITES
    assert json.loads((tmp_path / "poc" / "results" / "metrics.json").read_text())["mean"]["dice"] > 0
    for s in SITES:  # personalized checkpoints stay at each site, outside FLARE's job folders
        assert (poc.kit_dir / s / "lcfed_models" / "lcfed-tiny" / "best.pt").is_file()
        cfg = json.loads((poc.kit_dir / s / "local" / "lcfed_site.json").read_text())
        assert cfg["data_root"] == str(Path(data4).resolve())
    assert processes_using(poc.poc_dir) == []


def test_production_kits_on_loopback(job4, data4, tmp_path):
    project = REPO / "provisioning" / "project.yml"
    kits = provision(project, tmp_path / "kits")
    for s in SITES:
        write_site_config(kits / s, data4)
    fed = Federation(kits, SITES, project_admin(project), show=_quiet)
    try:
        fed.start()
        # a hospital's IT admin (org_admin) may not submit jobs, and LC-Fed jobs carry their own code
        with pytest.raises(SubmissionRefused, match="it@hospital-b.org.*not authorized for 'submit_job'"):
            fed.submit(job4, admin="it@hospital-b.org")
        outcome = fed.run_job(job4, timeout=900)
    finally:
        fed.shutdown()
    assert outcome["status"] == "FINISHED:COMPLETED"
    for s in SITES:
        assert (kits / s / "lcfed_models" / "lcfed-tiny" / "best.pt").is_file()
    assert processes_using(kits) == []
