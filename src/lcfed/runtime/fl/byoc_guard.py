"""Server component: refuse, at submission, any job that brings its own code.

FLARE 2.9 checks the submitter's ``byoc`` right only when it deploys a job (on the server and on each
site), so a job with ``app/custom`` is first accepted and then fails to deploy. A federation that runs
only the installed, reviewed bundle wants the refusal where the job enters: this component, listed in
the server's ``local/resources.json.default`` by :class:`lcfed.ops.provisioning.AllowListBuilder`, blocks
such a job on FLARE's ``SUBMIT_JOB`` event with a reason the submitter sees.
"""

from __future__ import annotations

from nvflare.apis.app_validation import AppValidationKey
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext

__all__ = ["ByocSubmissionGuard", "BYOC_REFUSAL"]

BYOC_REFUSAL = (
    "BYOC not permitted: job {name!r} brings its own code (app/custom); this federation runs only the lcfed "
    "bundle installed at each site. Submit the configuration-only job instead (python -m lcfed job export)"
)


class ByocSubmissionGuard(FLComponent):
    """Blocks every submitted job whose app folders carry code (FLARE marks it BYOC while validating it)."""

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.SUBMIT_JOB:
            return
        meta = fl_ctx.get_prop(FLContextKey.JOB_META) or {}
        if meta.get(AppValidationKey.BYOC):
            reason = BYOC_REFUSAL.format(name=meta.get("name", "?"))
            self.log_warning(fl_ctx, reason)
            fl_ctx.set_prop(FLContextKey.JOB_BLOCK_REASON, reason, private=True, sticky=False)
