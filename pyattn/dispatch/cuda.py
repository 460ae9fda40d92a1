"""The CUDA C++ backend (`pyattn._cuda`): fused softmax attention (tensor-core forward and backward,
split-KV decoding, a scalar float32 forward) and causal linear attention (chunked forward and
backward, a recurrent decoding step).

Which kernel runs a call is the module's launch plan, asked here with the call's shape and the
device's properties, so that what `cannot_run` promises is what the launcher does. The kernels
compile on every machine but run only on a GPU; `backend=None` picks one only when the committed
record (`cuda_registry`) says it passed the GPU tests and was measured faster than Triton for the
shape. `backend="cuda"` runs them regardless.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Tuple

import torch

from . import _compiled, cuda_registry

NAME = "cuda"
_RECORDS = cuda_registry.load()
# backend=None considers CUDA at all only when some kernel passed on hardware (then per call, below).
DEFAULT_OK = any(cuda_registry.passed(r) for r in _RECORDS.values())

_OPS = frozenset({"attention", "linear_attention"})
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FEATURES = frozenset({"window", "softcap", "causal",  # softmax
                       "decay", "initial_state"})  # linear
_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def unavailable() -> Optional[str]:
    from .. import _extension

    reason = _extension.cuda_unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    return reason


def kernel_status() -> Dict[str, str]:
    return {name: cuda_registry.describe(record) for name, record in _RECORDS.items()}


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> tuple:
    from ..launchers.cuda_softmax import device_info

    return device_info(torch.device("cuda", index))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def plans(request, device_info: Optional[tuple] = None) -> List[Tuple[str, dict]]:
    """[(direction, launch plan)] the call would run: the forward, and the backward when inputs need grad."""
    info = device_info or _device_info(_index(request.device))
    directions = ("forward", "backward") if request.needs_grad else ("forward",)
    if request.op == "attention":
        from ..launchers import cuda_softmax

        b, hq, hkv, sq, sk = request.shape
        sizes = ((b, hq, sq, request.head_dim), (b, hkv, sk, request.head_dim), (b, hkv, sk, request.head_dim_v))
        # window sizes and the softcap value do not change a plan, only whether they are there
        masks = dict(causal="causal" in request.features, window_left=1 if "window" in request.features else -1,
                     window_right=-1, softcap=1.0 if "softcap" in request.features else 0.0)
        return [(d, cuda_softmax.plan(d, *sizes, dtype=request.dtype, device_info=info, **masks)) for d in directions]
    from ..launchers import cuda_linear
    from ..launchers._marshal import DTYPE_CODES

    b, hq, hkv, s = request.shape
    module = cuda_linear.module()
    args = module.LinearArgs(sizes=(b, hq, hkv, s, request.head_dim, request.head_dim_v),
                             dtype=DTYPE_CODES[request.dtype], feature_map=0, causal="causal" in request.features,
                             normalize=True, scale=1.0, eps=1e-6)
    flags = dict(has_decay="decay" in request.features, has_initial_state="initial_state" in request.features,
                 has_final_state=True, device_info=info)
    return [(d, cuda_linear.plan(d, args, **flags)) for d in directions]


def cannot_run(request) -> Optional[str]:
    gap = _compiled.kernel_gap(request, backend=NAME, device_type="cuda", ops=_OPS, dtypes=_DTYPES,
                               features=_FEATURES, kernel_words="CUDA C++", backward=True)
    if gap is not None:
        return gap
    if request.op == "linear_attention" and "causal" not in request.features:
        return "the CUDA C++ linear attention kernels are causal only"
    for direction, plan in plans(request):
        if plan["error"] is not None:
            return f"{plan['kernel']} ({direction}): {plan['error']}"
    return None


def _length(request) -> int:
    """The length a benchmark range is keyed on: keys for softmax attention, tokens for linear."""
    return request.shape[4] if request.op == "attention" else request.shape[3]


def not_default(request, device_info: Optional[tuple] = None, records: Optional[dict] = None) -> Optional[str]:
    records = _RECORDS if records is None else records
    for direction, plan in plans(request, device_info):
        name, record = plan["kernel"], records[plan["kernel"]]
        if not cuda_registry.passed(record):
            return (f"{name} is {cuda_registry.describe(record)} on hardware (pyattn/dispatch/cuda_verified.json); "
                    "only used when named")
        if not cuda_registry.faster_than_triton(record, direction=direction, dtype=_DTYPE_NAMES[request.dtype],
                                                head_dim_bucket=plan["head_dim_bucket"],
                                                causal="causal" in request.features, seq=_length(request)):
            return f"{name} is not recorded faster than Triton for this shape"
    return None


def kernel(request) -> str:
    parts = [f"{plan['kernel']} [{cuda_registry.describe(_RECORDS[plan['kernel']])}]" for _, plan in plans(request)]
    return "pyattn._cuda " + " + ".join(parts)


# --------------------------------------------------------------------------- softmax attention

def attention_forward(inputs, *, dropout_seed, dropout_p, **params):
    from ..launchers import cuda_softmax

    return _compiled.attention_forward(cuda_softmax.softmax_forward, inputs, **params)


def attention_backward(grads, inputs, outputs, needs, *, dropout_seed, dropout_p, causal, scale, window_left,
                       window_right, softcap):
    from ..launchers import cuda_softmax

    q, k, v, _ = inputs
    out, lse = outputs
    dout = torch.zeros_like(out) if grads[0] is None else grads[0].to(out.dtype)
    dq, dk, dv = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for x in (q, k, v))
    cuda_softmax.softmax_backward(q, k, v, out, dout, lse, grads[1], dq, dk, dv, scale=scale, causal=causal,
                                  window_left=window_left, window_right=window_right, softcap=softcap)
    return dq, dk, dv, None


# --------------------------------------------------------------------------- linear attention

def linear_attention_forward(inputs, **params):
    from ..launchers import cuda_linear

    return _compiled.linear_attention_forward(cuda_linear.linear_forward, inputs, **params)


def linear_attention_backward(grads, inputs, outputs, needs, **params):
    from ..launchers import cuda_linear

    return _compiled.linear_attention_backward(cuda_linear.linear_backward, grads, inputs, needs, **params)
