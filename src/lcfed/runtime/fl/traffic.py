"""Measure what actually crosses the wire: a server-side filter that sizes every task and result.

The size is the length of the FOBS serialization of the Shareable as the server hands it to / gets it
from FLARE's messaging (headers, metadata and arrays included), not a count of parameters. ``payload`` is
the serialized DXO alone (arrays and their metadata, quantization state included): the part a site's
outgoing audit logs identically, since FLARE adds its task headers to a result after the site's filters.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.fuel.utils import fobs

from ..data.layout import write_json_atomic

__all__ = ["TrafficMeter", "TRAFFIC_FILE", "payload_bytes"]

TRAFFIC_FILE = "lcfed_traffic.json"


def _keys_of(shareable: Shareable) -> list[str]:
    """The parameter names a result carries (what arrived, for the privacy tests and for IT audits)."""
    try:
        data = from_shareable(shareable).data
    except ValueError:
        return []
    return sorted(data) if isinstance(data, dict) else []


def payload_bytes(shareable: Shareable) -> int:
    """Serialized size of the message's DXO (0 for a message without one, e.g. an error reply)."""
    try:
        dxo = from_shareable(shareable)
    except ValueError:
        return 0
    return len(fobs.dumps(dxo.to_dict()))


class TrafficMeter(Filter):
    """Record the serialized size of each message exchanged with each site.

    Add it on the server twice: as a task data filter (``direction="to_site"``) and as a task result
    filter (``direction="from_site"``). Both write into ``lcfed_traffic.json`` in the server's app folder.

    Args:
        direction: "to_site" or "from_site".
    """

    _lock = threading.Lock()

    def __init__(self, direction: str = "from_site"):
        super().__init__()
        if direction not in ("to_site", "from_site"):
            raise ValueError(f"direction must be 'to_site' or 'from_site', got {direction!r}")
        self.direction = direction

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        size = len(fobs.dumps(shareable))
        peer = fl_ctx.get_peer_context()
        site = peer.get_identity_name() if peer is not None else "?"
        task = fl_ctx.get_prop(ReservedKey.TASK_NAME, "?")
        app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(fl_ctx.get_job_id()))
        path = app_dir / TRAFFIC_FILE
        with self._lock:
            record = json.loads(path.read_text()) if path.is_file() else {"to_site": [], "from_site": []}
            entry = {"site": site, "task": task, "bytes": size, "payload": payload_bytes(shareable)}
            entry["time"] = time.time()
            if self.direction == "from_site":
                entry["keys"] = _keys_of(shareable)
            record[self.direction].append(entry)
            write_json_atomic(path, record)
        return shareable
