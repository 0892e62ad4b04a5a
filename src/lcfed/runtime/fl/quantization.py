"""Message quantization in both directions, in the wire format of FLARE's ``nvflare.app_opt.pt.quantization``.

FLARE 2.9's ``ModelQuantizer`` / ``ModelDequantizer`` import ``bitsandbytes`` at module level, so they cannot
even be loaded on a site without it (a CPU-only hospital typically has none), although two of their types
need no GPU: ``float16`` and ``adaquant``. These two filters do those types themselves (``adaquant`` with
FLARE's own ``AdaQuantizer``) and hand the 8- and 4-bit types (``blockwise8``, ``float4``, ``normfloat4``) to
FLARE's classes, which need a CUDA device and ``bitsandbytes``. The message is FLARE's either way: the
quantized arrays under their own names, and the DXO meta keys ``PROCESSED_ALGORITHM`` (the type),
``quant_state``, ``source_datatype`` and ``quantized_flag``; FLARE's ``ModelDequantizer`` reads what
:class:`MessageQuantizer` writes and :class:`MessageDequantizer` reads what FLARE's ``ModelQuantizer`` writes.

Unlike FLARE's quantizer, neither filter changes the arrays of the message it receives: the server sends
the same task data to every site, and the global model it keeps must stay in full precision. Arrays that
are not floating point (none in the bundle's models) travel unchanged.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

__all__ = [
    "MessageQuantizer",
    "MessageDequantizer",
    "QUANTIZATION_TYPES",
    "CPU_TYPES",
    "GPU_TYPES",
    "QUANT_META_KEYS",
    "check_quantization_type",
    "quantize_arrays",
    "dequantize_arrays",
]

CPU_TYPES = ("float16", "adaquant")
GPU_TYPES = ("blockwise8", "float4", "normfloat4")  # bitsandbytes on a CUDA device
QUANTIZATION_TYPES = CPU_TYPES + GPU_TYPES
# the DXO meta keys quantization adds (FLARE's names)
QUANT_STATE, SOURCE_DTYPE, QUANTIZED_FLAG = "quant_state", "source_datatype", "quantized_flag"
QUANT_META_KEYS = (MetaKey.PROCESSED_ALGORITHM, QUANT_STATE, SOURCE_DTYPE, QUANTIZED_FLAG)
_FLOATS = ("float32", "float16", "bfloat16")
_FP16_MIN, _FP16_MAX = float(np.finfo(np.float16).min), float(np.finfo(np.float16).max)


def check_quantization_type(quantization_type: str, need_runtime: bool = True) -> str:
    """The type in lower case; raises ``ValueError`` for an unknown one, or a GPU type where it cannot run."""
    qtype = (quantization_type or "").lower()
    if qtype not in QUANTIZATION_TYPES:
        raise ValueError(f"unknown quantization type {quantization_type!r}; choose one of {list(QUANTIZATION_TYPES)}")
    if need_runtime and qtype in GPU_TYPES:
        missing = []
        if importlib.util.find_spec("bitsandbytes") is None:
            missing.append("the bitsandbytes package")
        if not torch.cuda.is_available():
            missing.append("a CUDA device")
        if missing:
            raise ValueError(
                f"quantization type {qtype!r} needs {' and '.join(missing)} (FLARE quantizes 8 and 4 bits with "
                f"bitsandbytes on a GPU); on CPU use one of {list(CPU_TYPES)}"
            )
    return qtype


def _dtype_name(values: Any) -> str:
    if isinstance(values, np.ndarray):
        return values.dtype.name
    if isinstance(values, torch.Tensor):
        return str(values.dtype).split(".")[1]
    raise ValueError(f"cannot quantize a {type(values).__name__}: expected numpy arrays or torch tensors")


def quantize_arrays(params: dict[str, Any], qtype: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """``(quantized params, quant_state, source_datatype)`` for ``float16`` or ``adaquant`` (a new dict)."""
    from nvflare.app_opt.pt.quantization.ada_quant import AdaQuantizer

    out: dict[str, Any] = {}
    state: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name, values in params.items():
        dtype = _dtype_name(values)
        source[name] = dtype
        state[name] = {}
        if dtype not in _FLOATS or (qtype == "float16" and dtype != "float32"):
            out[name] = values  # integers and already 16-bit floats travel as they are
            continue
        if qtype == "float16":
            if isinstance(values, np.ndarray):
                out[name] = np.clip(values, _FP16_MIN, _FP16_MAX).astype(np.float16)
            else:
                out[name] = torch.clamp(values, _FP16_MIN, _FP16_MAX).to(torch.float16)
        elif qtype == "adaquant":
            tensor = torch.as_tensor(values).cpu()
            quantized, qstate = AdaQuantizer().quantize(tensor)
            if isinstance(values, np.ndarray):
                out[name] = quantized.numpy() if isinstance(quantized, torch.Tensor) else quantized
            else:
                out[name] = quantized if isinstance(quantized, torch.Tensor) else torch.as_tensor(quantized)
            if qstate:
                state[name] = qstate
        else:
            raise ValueError(f"quantize_arrays does {list(CPU_TYPES)}, not {qtype!r}")
    return out, state, source


def dequantize_arrays(
    params: dict[str, Any], qtype: str, state: dict[str, Any], source: dict[str, str]
) -> dict[str, Any]:
    """The arrays back in their source precision (a new dict), for ``float16`` or ``adaquant``."""
    from nvflare.app_opt.pt.quantization.ada_quant import AdaQuantizer

    out: dict[str, Any] = {}
    for name, values in params.items():
        dtype = source.get(name)
        if dtype is None:
            raise ValueError(f"quantized message without the source data type of {name!r}")
        if dtype not in _FLOATS:
            out[name] = values
            continue
        restored = values
        if qtype == "adaquant" and state.get(name):
            restored = AdaQuantizer().dequantized(torch.as_tensor(values), state[name])
            restored = restored.numpy() if isinstance(values, np.ndarray) else restored
        if isinstance(restored, np.ndarray):
            out[name] = restored.astype(np.dtype(dtype))
        else:
            out[name] = restored.to(getattr(torch, dtype))
    return out


class MessageQuantizer(DXOFilter):
    """Quantize the weights (or differences) of a message: a result filter at a site, a task data filter on the server.

    Args:
        quantization_type: ``float16`` or ``adaquant`` (any device), or ``blockwise8``, ``float4``,
            ``normfloat4`` (FLARE's ``ModelQuantizer``: bitsandbytes on a CUDA device).
    """

    _always_serialize_args = ("quantization_type",)

    def __init__(self, quantization_type: str = "float16"):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.quantization_type = check_quantization_type(quantization_type, need_runtime=False)
        self._flare = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if dxo.get_meta_prop(QUANTIZED_FLAG):
            return None  # quantized already
        qtype = self.quantization_type
        if qtype in GPU_TYPES:
            if self._flare is None:
                check_quantization_type(qtype)
                from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

                self._flare = ModelQuantizer(quantization_type=qtype)
            # FLARE's quantizer replaces the arrays in the dict it gets: give it a copy of the dict
            return self._flare.process_dxo(DXO(dxo.data_kind, dict(dxo.data), dict(dxo.meta)), shareable, fl_ctx)
        data, state, source = quantize_arrays(dxo.data, qtype)
        new = DXO(data_kind=dxo.data_kind, data=data, meta=dict(dxo.meta))
        new.set_meta_prop(MetaKey.PROCESSED_ALGORITHM, qtype)
        new.set_meta_prop(QUANT_STATE, state)
        new.set_meta_prop(SOURCE_DTYPE, source)
        new.set_meta_prop(QUANTIZED_FLAG, True)
        return new


class MessageDequantizer(DXOFilter):
    """Restore a quantized message to its source precision: a task data filter at a site, a result filter on the server.

    A message that is not quantized passes unchanged; any type FLARE's quantizer writes is read (8 and 4
    bits with FLARE's ``ModelDequantizer``, which needs bitsandbytes on a CUDA device).
    """

    def __init__(self):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self._flare = None

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        qtype = dxo.get_meta_prop(MetaKey.PROCESSED_ALGORITHM)
        if not dxo.get_meta_prop(QUANTIZED_FLAG) or qtype is None:
            return None  # not quantized: nothing to do
        qtype = check_quantization_type(str(qtype), need_runtime=False)
        if qtype in GPU_TYPES:
            if self._flare is None:
                check_quantization_type(qtype)
                from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer

                self._flare = ModelDequantizer()
            return self._flare.process_dxo(DXO(dxo.data_kind, dict(dxo.data), dict(dxo.meta)), shareable, fl_ctx)
        state, source = dxo.get_meta_prop(QUANT_STATE) or {}, dxo.get_meta_prop(SOURCE_DTYPE) or {}
        data = dequantize_arrays(dxo.data, qtype, state, source)
        meta = {k: v for k, v in dxo.meta.items() if k not in QUANT_META_KEYS}
        return DXO(data_kind=dxo.data_kind, data=data, meta=meta)
