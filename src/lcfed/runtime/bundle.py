"""The installed bundle's version, and the check that a job runs on the version it was exported with.

A job folder carries configuration only; the code that runs is the ``lcfed`` bundle installed at each
site and at the server. The job records the version it was exported with (``bundle_version`` of the
learner and the persistor); a participant whose installed bundle differs refuses the job, so that no
hospital trains with code its IT team did not install on purpose, and no two sites run different maths.
"""

from __future__ import annotations

import lcfed

__all__ = ["BundleVersionMismatch", "installed_version", "check_bundle_version"]


class BundleVersionMismatch(RuntimeError):
    """The job was exported with another version of the bundle than the one installed here."""


def installed_version() -> str:
    return lcfed.__version__


def check_bundle_version(job_version: str, participant: str) -> None:
    """Raise :class:`BundleVersionMismatch` naming both versions when they differ.

    An empty ``job_version`` (a hand-written job that pins nothing) is accepted.
    """
    installed = installed_version()
    if job_version and job_version != installed:
        raise BundleVersionMismatch(
            f"{participant} refuses the job: it was exported with lcfed {job_version}, but this {participant} has "
            f"lcfed {installed} installed. Install lcfed=={job_version} here, or re-export the job with "
            f"lcfed {installed} (python -m lcfed job export)"
        )
