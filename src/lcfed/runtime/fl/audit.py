"""What leaves a hospital, checked and written down at the hospital: the last filter on every result.

``OutgoingAudit`` runs on the client after the job's other result filters (privacy filters included). It
refuses any result that holds a parameter outside the algorithm's contract (shared keys and the site's
own banked head) or a non-scalar metric, and appends one JSON line per result to
``<site models folder>/<job name>/outgoing_audit.jsonl``: task, round, data kind, every tensor's name and
shape, the metric names and values, the quantization type if the job quantizes, and the serialized size
(after quantization: the bytes that leave; ``payload``, the DXO alone, is what the server's traffic meter
logs for the same message). Hospital IT can read that file to see exactly what was sent.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.dxo import DataKind, MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.fuel.utils import fobs

from ..contract import ContractViolation
from .controller import REFUSAL_HEADER
from .quantization import QUANT_META_KEYS, QUANT_STATE, SOURCE_DTYPE
from .reference import MODEL_ARGS, reference_model
from .site_config import models_root
from .traffic import payload_bytes

__all__ = ["OutgoingAudit", "AUDIT_FILE"]

AUDIT_FILE = "outgoing_audit.jsonl"
# the step count and training-sample count (for sample-weighted averaging), the metrics, and FLARE's own
# list of the filters applied
_ALLOWED_META = {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS, "n_train", MetaKey.FILTER_HISTORY}
# FLARE's message quantization: its type, and per tensor the source data type and the state to restore it
_QUANT_META = set(QUANT_META_KEYS)


class OutgoingAudit(Filter):
    """Check every outgoing result against the contract and log it at the site.

    Args: the model arguments of the job (they fix the contract and the model's key set), and
        run_name: the job name (names the site's models folder).
    """

    _always_serialize_args = MODEL_ARGS + ("run_name",)

    def __init__(
        self,
        algorithm: str = "lcfed",
        sites: list[str] | None = None,
        preset: str = "demo",
        options: dict[str, Any] | None = None,
        in_channels: int = 1,
        n_classes: int = 1,
        run_name: str = "lcfed",
    ):
        super().__init__()
        self.algorithm = algorithm
        self.sites = sites
        self.preset = preset
        self.options = options
        self.in_channels = in_channels
        self.n_classes = n_classes
        self.run_name = run_name
        algo, model, _ = reference_model(algorithm, sites, preset, options, in_channels, n_classes)
        self.contract = algo.contract
        self.model_keys = list(model.state_dict().keys())

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = fl_ctx.get_identity_name()
        rc = shareable.get_return_code(ReturnCode.OK)
        record: dict[str, Any] = {
            "time": time.time(),
            "task": fl_ctx.get_prop(ReservedKey.TASK_NAME, "?"),
            "round": _round_of(shareable, fl_ctx),
            "bytes": len(fobs.dumps(shareable)),
            "payload": payload_bytes(shareable),
        }
        if rc != ReturnCode.OK:
            # an error reply (a refusal, an aborted task) carries no data, only its code and the site's reason
            if shareable.get_header(ReservedHeaderKey.CONTENT_TYPE) or set(shareable) - {"__headers__"}:
                raise ContractViolation(f"site {site!r} would send data with the error reply {rc!r}")
            record.update(return_code=rc, refusal=shareable.get_header(REFUSAL_HEADER))
            self._write(site, fl_ctx, record)
            return shareable
        dxo = from_shareable(shareable)
        record["data_kind"] = dxo.data_kind
        if dxo.data_kind in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            # the contract's keys only; shared keys may be missing when a privacy filter removed them
            self.contract.check_outgoing(dxo.data.keys(), self.model_keys, site, allow_missing_shared=True)
            record["tensors"] = _shapes(dxo, site)
            record["n_values"] = int(sum(np.prod(shape, dtype=np.int64) for shape in record["tensors"].values()))
            if dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM) is not None:
                record["quantization"] = str(dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM))
            metrics = dxo.meta.get(MetaKey.INITIAL_METRICS) or {}
        elif dxo.data_kind == DataKind.METRICS:
            record["tensors"] = {}
            metrics = dxo.data
        else:
            raise ContractViolation(
                f"site {site!r} would send data of kind {dxo.data_kind!r}, which LC-Fed never sends"
            )
        allowed = _ALLOWED_META | (_QUANT_META if dxo.data_kind != DataKind.METRICS else set())
        unexpected_meta = sorted(k for k in dxo.meta if k not in allowed and not k.startswith("__"))
        if unexpected_meta:
            raise ContractViolation(f"site {site!r} would send unexpected metadata {unexpected_meta}")
        for name, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ContractViolation(f"site {site!r} would send a non-scalar metric {name!r}")
        record["metrics"] = {k: float(v) for k, v in metrics.items()}
        record["meta"] = {
            k: (v if k == MetaKey.FILTER_HISTORY else float(v))
            for k, v in dxo.meta.items()
            if k != MetaKey.INITIAL_METRICS and k not in _QUANT_META
        }
        self._write(site, fl_ctx, record)
        return shareable

    def _write(self, site: str, fl_ctx: FLContext, record: dict[str, Any]) -> None:
        path = models_root(site, fl_ctx.get_engine().get_workspace().get_root_dir()) / self.run_name / AUDIT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")


def _shapes(dxo, site: str) -> dict[str, list[int]]:
    """Each tensor's shape; for a quantized message the shape it is restored to, after checking that the
    quantization state describes only the tensors the message carries (no extra payload under its cover)."""
    shapes = {k: list(np.shape(v)) for k, v in dxo.data.items()}
    for meta_key in (QUANT_STATE, SOURCE_DTYPE):
        described = dxo.meta.get(meta_key)
        if described is None:
            continue
        if not isinstance(described, dict) or set(described) - set(shapes):
            extra = sorted(set(described) - set(shapes)) if isinstance(described, dict) else type(described).__name__
            raise ContractViolation(
                f"site {site!r} would send quantization metadata {meta_key!r} beyond its tensors: {extra}"
            )
    for name, state in (dxo.meta.get(QUANT_STATE) or {}).items():
        # adaquant ("tensor_shape") and the 4-bit types ("shape") send packed or placeholder arrays
        shape = state.get("tensor_shape", state.get("shape")) if isinstance(state, dict) else None
        if shape is not None:
            shapes[name] = [int(n) for n in shape]
    return shapes


def _round_of(shareable: Shareable, fl_ctx: FLContext) -> int | None:
    """The round this result answers: the learner's round header, else the task's."""
    round_idx = shareable.get_header(AppConstants.CURRENT_ROUND)
    if round_idx is None:
        task = fl_ctx.get_prop(FLContextKey.TASK_DATA)
        round_idx = task.get_header(AppConstants.CURRENT_ROUND) if isinstance(task, Shareable) else None
    return None if round_idx is None else int(round_idx)


def read_audit(path: str | Path) -> list[dict[str, Any]]:
    """The audit log as a list of records."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
