"""What a site's FLARE workspace must allow so that configuration-only LC-Fed jobs run, and nothing more.

FLARE 2.9 builds a job's components only from classes on the participant's class allow-list
(``class_allow_list`` in ``local/resources.json[.default]``, enforced by FLARE's
``ComponentPathAuthorizer``) unless the job brings its own code (BYOC), which needs the submitter's
``byoc`` right. This bundle's jobs bring no code, so each participant must allow:

- the bundle's FLARE components (:data:`BUNDLE_CLASSES`), which run from the installed ``lcfed``;
- the FLARE classes the jobs use that FLARE's default list lacks (:data:`FLARE_CLASSES`);

and the kits give the ``byoc`` right to no role, so that nobody can run code in a hospital that its IT
team did not install. One function per file (:func:`extend_allow_list`, :func:`remove_byoc`) serves
the provisioning builder (:class:`AllowListBuilder`, run by ``nvflare provision``), the POC workspace and
the simulator's workspace alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLE_CLASSES",
    "FLARE_CLASSES",
    "allowed_classes",
    "extend_allow_list",
    "remove_byoc",
    "configure_local_dir",
    "add_byoc_guard",
    "AllowListBuilder",
]

# the bundle's components that a job config names (server and sites)
BUNDLE_CLASSES = (
    "lcfed.runtime.fl.aggregator.HeadBankAggregator",
    "lcfed.runtime.fl.audit.OutgoingAudit",
    "lcfed.runtime.fl.controller.SiteListFedAvg",
    "lcfed.runtime.fl.learner.LCFedLearner",
    "lcfed.runtime.fl.persistor.GlobalStatePersistor",
    "lcfed.runtime.fl.quantization.MessageDequantizer",
    "lcfed.runtime.fl.quantization.MessageQuantizer",
    "lcfed.runtime.fl.traffic.TrafficMeter",
)

# FLARE's own classes the jobs name (ExcludeVars and PercentilePrivacy are on FLARE's default list already;
# listed here so that a site whose list was replaced still runs every job option)
FLARE_CLASSES = (
    "nvflare.app_common.executors.learner_executor.LearnerExecutor",
    "nvflare.app_common.filters.exclude_vars.ExcludeVars",
    "nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
)

CLASS_ALLOW_LIST = "class_allow_list"
ENFORCEMENT = "class_list_enforcement_mode"
RESOURCES = "resources.json"
RESOURCES_DEFAULT = "resources.json.default"
AUTHORIZATION = "authorization.json"
AUTHORIZATION_DEFAULT = "authorization.json.default"
# every right of FLARE 2.9's authorization policy; a role given "any" gets these, BYOC excepted
RIGHTS = (
    "submit_job",
    "clone_job",
    "manage_job",
    "download_job",
    "view",
    "operate",
    "shell_commands",
    "byoc",
    "server-predeployed-flwr",
)


def allowed_classes() -> tuple[str, ...]:
    return BUNDLE_CLASSES + FLARE_CLASSES


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def extend_allow_list(resources_file: str | os.PathLike) -> list[str]:
    """Add the bundle's and the jobs' classes to the file's ``class_allow_list``; enforcement stays on.

    A file without a list starts from FLARE's default list (what the site allowed before). A site that
    had switched enforcement off or to "warn" is set back to "enforce". Returns the classes added.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    path = Path(resources_file)
    resources = _read_json(path)
    current = resources.get(CLASS_ALLOW_LIST)
    if current is None:
        current = list(DEFAULT_CLASS_ALLOW_LIST)
    if not isinstance(current, list):
        raise ValueError(f"{path}: {CLASS_ALLOW_LIST} must be a list, got {type(current).__name__}")
    if "*" in current:
        raise ValueError(f"{path}: {CLASS_ALLOW_LIST} allows every class ('*'); remove it before adding the bundle's")
    added = [c for c in allowed_classes() if c not in current]
    resources[CLASS_ALLOW_LIST] = current + added
    resources[ENFORCEMENT] = "enforce"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, resources)
    return added


def remove_byoc(authorization_file: str | os.PathLike) -> list[str]:
    """Give the ``byoc`` right to no role (a role with "any" keeps every other right). Returns the roles changed."""
    path = Path(authorization_file)
    policy = _read_json(path)
    permissions = policy.get("permissions")
    if not isinstance(permissions, dict):
        raise ValueError(f"{path}: no 'permissions' section")
    changed = []
    for role, rights in permissions.items():
        if rights == "any":
            permissions[role] = {right: ("none" if right == "byoc" else "any") for right in RIGHTS}
            changed.append(role)
        elif isinstance(rights, dict) and rights.get("byoc", "none") != "none":
            rights["byoc"] = "none"
            changed.append(role)
    _write_json(path, policy)
    return changed


GUARD_ID = "lcfed_byoc_guard"
GUARD_PATH = "lcfed.runtime.fl.byoc_guard.ByocSubmissionGuard"


def add_byoc_guard(resources_file: str | os.PathLike) -> bool:
    """List the server component that refuses BYOC jobs at submission; False if it was there already.

    FLARE 2.9 itself checks the ``byoc`` right only when it deploys a job, after accepting the submission.
    """
    path = Path(resources_file)
    resources = _read_json(path)
    components = resources.setdefault("components", [])
    if any(c.get("id") == GUARD_ID for c in components):
        return False
    components.append({"id": GUARD_ID, "path": GUARD_PATH, "args": {}})
    _write_json(path, resources)
    return True


def configure_local_dir(local_dir: str | os.PathLike, server: bool = False) -> None:
    """Allow the bundle in one participant's ``local/`` folder, remove BYOC from its policy and, on the server,
    refuse BYOC jobs at submission.

    FLARE reads ``resources.json`` before ``resources.json.default`` (likewise for the authorization policy);
    a POC writes both, so every one present is edited (the ``.default`` one is created if neither exists).
    """
    local_dir = Path(local_dir)
    resources = [local_dir / n for n in (RESOURCES, RESOURCES_DEFAULT) if (local_dir / n).is_file()]
    for path in resources or [local_dir / RESOURCES_DEFAULT]:
        extend_allow_list(path)
        if server:
            add_byoc_guard(path)
    for name in (AUTHORIZATION, AUTHORIZATION_DEFAULT):
        if (local_dir / name).is_file():
            remove_byoc(local_dir / name)


try:  # the builder needs FLARE's provisioning API; the functions above do not
    from nvflare.lighter.spec import Builder as _Builder
except ImportError:  # pragma: no cover - FLARE is a dependency of the bundle
    _Builder = object  # type: ignore[assignment,misc]


class AllowListBuilder(_Builder):
    """Provisioning builder: the bundle's classes on every server's and client's allow-list; BYOC for no role.

    Use it in ``project.yml`` after FLARE's ``StaticFileBuilder`` (which writes the files it edits)::

        - path: lcfed.ops.provisioning.AllowListBuilder

    Args:
        byoc: leave the authorization policy's ``byoc`` rights as FLARE wrote them (False: none for every role).
    """

    def __init__(self, byoc: bool = False):
        self.byoc = byoc

    def build(self, project, ctx) -> None:
        participants = [p for p in [project.get_server(), *project.get_clients()] if p is not None]
        for participant in participants:
            local_dir = Path(ctx.get_local_dir(participant))
            if not (local_dir / RESOURCES_DEFAULT).is_file():
                raise RuntimeError(
                    f"{local_dir / RESOURCES_DEFAULT} does not exist: list AllowListBuilder after StaticFileBuilder"
                )
            extend_allow_list(local_dir / RESOURCES_DEFAULT)
            if not self.byoc:
                remove_byoc(local_dir / AUTHORIZATION_DEFAULT)
                if participant is project.get_server():
                    add_byoc_guard(local_dir / RESOURCES_DEFAULT)
