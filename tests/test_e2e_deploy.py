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
from lcfed.ops.jobs import JobSpec, export_job, pack_job
from lcfed.ops.poc import PocWorkspace
from lcfed.ops.production import Federation, project_admin, provision, write_site_config
from lcfed.ops.run import RunFailed, job_folder_info, simulate_job_folder

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


def _other_version(job: Path, out: Path) -> Path:
    """A copy of ``job`` whose sites' learner asks for a bundle version nobody has installed."""
    import shutil

    copy = out / "lcfed-other-version"
    shutil.copytree(job, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["name"] = copy.name
    (copy / "meta.json").write_text(json.dumps(meta))
    cfg = copy / "app" / "config" / "config_fed_client.json"
    client = json.loads(cfg.read_text())
    learner = next(c for c in client["components"] if c["id"] == "learner")
    learner["args"]["bundle_version"] = "0.0.1"
    cfg.write_text(json.dumps(client))
    return copy


def test_production_kits_on_loopback(job4, data4, tmp_path):
    """Config-only jobs on provisioned kits: allow-listed, pinned, and BYOC refused for every role."""
    project = REPO / "provisioning" / "project.yml"
    kits = provision(project, tmp_path / "kits")
    for s in SITES:
        write_site_config(kits / s, data4)
        resources = json.loads((kits / s / "local" / "resources.json.default").read_text())
        assert "lcfed.runtime.fl.learner.LCFedLearner" in resources["class_allow_list"]
        assert resources["class_list_enforcement_mode"] == "enforce"
    for participant in ["server", *SITES]:
        authz = json.loads((kits / participant / "local" / "authorization.json.default").read_text())
        assert all(rights["byoc"] == "none" for rights in authz["permissions"].values() if "byoc" in rights)
        assert authz["permissions"]["project_admin"]["submit_job"] == "any"
    packed = pack_job(job4, tmp_path / "packed")
    other = _other_version(job4, tmp_path)
    fed = Federation(kits, SITES, project_admin(project), show=_quiet)
    try:
        fed.start()
        # a hospital's IT admin (org_admin) may not submit jobs at all
        with pytest.raises(SubmissionRefused, match="it@hospital-b.org.*not authorized for 'submit_job'"):
            fed.submit(job4, admin="it@hospital-b.org")
        # a job that brings its own code is refused at submission, even for the project admin
        with pytest.raises(SubmissionRefused, match="byoc|BYOC|custom code"):
            fed.submit(packed)
        # the configuration-only job runs on the installed bundle
        outcome = fed.run_job(job4, timeout=900)
        # a job exported for another bundle version is refused by every site, which the failure names
        with pytest.raises(RunFailed, match=r"site 'site-.' refuses the job.*lcfed 0\.0\.1.*lcfed 0\.2\.0"):
            fed.run_job(other, timeout=600)
    finally:
        fed.shutdown()
    assert outcome["status"] == "FINISHED:COMPLETED"
    for s in SITES:
        assert (kits / s / "lcfed_models" / "lcfed-tiny" / "best.pt").is_file()
    assert processes_using(kits) == []
