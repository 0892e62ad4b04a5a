"""Where a site finds its data: site-local configuration, never a path baked into the job.

Resolution order (first match wins):

1. ``<site workspace>/local/lcfed_site.json`` with ``{"data_root": "/path/to/data"}`` (optionally
   ``"site_dir"`` when the site's folder is not ``data_root/<site>``) -- what a hospital writes once;
2. the environment variable ``LCFED_DATA_ROOT`` of the site's process (POC mode, simulator);
3. the job's ``data_root`` argument (empty by default; only for a controlled single-machine setup).

``data_root`` is a data set folder in the convention of :mod:`lcfed.runtime.data.layout`: it holds
``dataset.json`` and the site's folder.

Personalized models are kept outside FLARE's per-job folders (which POC and production clients delete
when a job ends): in ``<site workspace>/lcfed_models/<job name>/``, or under ``"models_dir"`` of the
site configuration file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.layout import DataError

__all__ = [
    "SITE_CONFIG_FILE",
    "DATA_ROOT_ENV",
    "MODELS_DIR",
    "MODELS_ROOT_ENV",
    "SiteDataLocation",
    "resolve_site_data",
    "models_root",
]

MODELS_DIR = "lcfed_models"
MODELS_ROOT_ENV = "LCFED_MODELS_ROOT"

SITE_CONFIG_FILE = "lcfed_site.json"
DATA_ROOT_ENV = "LCFED_DATA_ROOT"


@dataclass(frozen=True)
class SiteDataLocation:
    data_root: Path
    site_dir: Path
    source: str  # which rule found it (for the log)


def resolve_site_data(site: str, workspace_root: str | os.PathLike | None, job_data_root: str = "") -> SiteDataLocation:
    """Find ``site``'s data; raises :class:`DataError` that says where it looked."""
    looked = []
    if workspace_root:
        cfg_file = Path(workspace_root) / "local" / SITE_CONFIG_FILE
        looked.append(str(cfg_file))
        cfg = _site_config(workspace_root, site)
        if cfg_file.is_file():
            if not cfg.get("data_root"):
                raise DataError('site configuration needs {"data_root": "<folder with dataset.json>"}', site, cfg_file)
            root = Path(cfg["data_root"]).expanduser()
            site_dir = Path(cfg.get("site_dir") or root / site).expanduser()
            return SiteDataLocation(root, site_dir, f"site configuration {cfg_file}")
    env = os.environ.get(DATA_ROOT_ENV, "")
    looked.append(f"${DATA_ROOT_ENV}")
    if env:
        root = Path(env).expanduser()
        return SiteDataLocation(root, root / site, f"environment variable {DATA_ROOT_ENV}")
    looked.append("the job's data_root argument")
    if job_data_root:
        root = Path(job_data_root).expanduser()
        return SiteDataLocation(root, root / site, "the job's data_root argument")
    raise DataError(
        "no data configured for this site; write "
        f'{{"data_root": "/path/to/data"}} to <site workspace>/local/{SITE_CONFIG_FILE} '
        f"or set {DATA_ROOT_ENV} (looked at: {', '.join(looked)})",
        site,
    )


def _site_config(workspace_root: str | os.PathLike | None, site: str) -> dict:
    if not workspace_root:
        return {}
    cfg_file = Path(workspace_root) / "local" / SITE_CONFIG_FILE
    if not cfg_file.is_file():
        return {}
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"malformed site configuration: {e}", site, cfg_file) from None
    if not isinstance(cfg, dict):
        raise DataError("site configuration must be a JSON object", site, cfg_file)
    return cfg


def models_root(site: str, workspace_root: str | os.PathLike | None) -> Path:
    """Where this site (or the server) keeps its models and run state, persistent across jobs.

    ``"models_dir"`` of the site configuration file; else ``$LCFED_MODELS_ROOT/<site>`` (the simulator
    wipes its own workspace at every start, so ``lcfed run`` keeps models beside it); else
    ``<site workspace>/lcfed_models``.
    """
    cfg = _site_config(workspace_root, site)
    if cfg.get("models_dir"):
        return Path(cfg["models_dir"]).expanduser()
    env = os.environ.get(MODELS_ROOT_ENV, "")
    if env:
        return Path(env).expanduser() / site
    return Path(workspace_root or ".") / MODELS_DIR
