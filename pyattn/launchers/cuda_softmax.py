"""Launcher of the CUDA fused softmax attention (``pyattn._cuda``), forward and backward.

q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv): CUDA tensors of one dtype on one device,
any strides. Which kernel runs (split-KV decoding for up to 16 queries, tensor cores for 16-bit
inputs, a scalar kernel for float32) is the module's launch plan (``plan``); the launcher allocates
the plan's float32 workspace on the current stream and queues the kernels there.
Semantics: ``shared/API.md`` section 1.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension
from ._marshal import DTYPE_CODES, compiled, pointer_and_strides, softmax_forward_args


def module():
    return compiled(_extension.load_cuda, _extension.cuda_unavailable_reason)


def device_info(device: torch.device) -> tuple:
    """(major, minor, multiprocessors, max opt-in shared memory per block) of a CUDA device, what the
    launch plans need."""
    p = torch.cuda.get_device_properties(device)
    optin = getattr(p, "shared_memory_per_block_optin", None)  # not in every torch build's properties
    if optin is None:  # the CUDA programming guide's limits for the architectures the wheel targets
        optin = _SMEM_OPTIN.get((p.major, p.minor), 99 * 1024 if p.major >= 8 else 48 * 1024)
    return (p.major, p.minor, p.multi_processor_count, int(optin))


_SMEM_OPTIN = {(8, 0): 163 * 1024, (8, 7): 163 * 1024, (9, 0): 227 * 1024, (10, 0): 227 * 1024}


def workspace(plan: dict, device: torch.device) -> tuple:
    """A float32 buffer of the plan's size on the current stream's allocator: (data_ptr(), floats), and the
    tensor, which must stay alive until the kernels are queued (the caching allocator then keeps it for
    the stream)."""
    n = int(plan["workspace_floats"])
    buf = torch.empty(max(n, 0), dtype=torch.float32, device=device)
    return (buf.data_ptr() if n else 0, n), buf


def _launch_kw(q: torch.Tensor) -> dict:
    device = q.device if q.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    return dict(dtype=DTYPE_CODES[q.dtype], device_info=device_info(device), device=device.index,
                stream=torch.cuda.current_stream(device).cuda_stream)


def plan(direction: str, q_size, k_size, v_size, *, dtype: torch.dtype, causal: bool, window_left: int,
         window_right: int, softcap: float, device_info: tuple) -> dict:
    """The module's launch plan for 'forward' or 'backward' (see pyattn._cuda.plan_softmax)."""
    return module().plan_softmax(direction, tuple(q_size), tuple(k_size), tuple(v_size), causal=bool(causal),
                                 window_left=int(window_left), window_right=int(window_right),
                                 softcap=float(softcap), dtype=DTYPE_CODES[dtype], device_info=device_info)


def softmax_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    lse: Optional[torch.Tensor], *, scale: float, causal: bool, window_left: int,
                    window_right: int, softcap: float) -> None:
    """Queues the forward on the current stream of ``q.device``; writes ``out`` (B, Hq, Sq, Dv) and ``lse``
    (float32 (B, Hq, Sq), or None: not written)."""
    kw = _launch_kw(q)
    masks = dict(causal=bool(causal), window_left=int(window_left), window_right=int(window_right),
                 softcap=float(softcap))
    ws, _buf = workspace(plan("forward", q.shape, k.shape, v.shape, dtype=q.dtype, device_info=kw["device_info"],
                              **masks), q.device)
    module().softmax_forward(*softmax_forward_args(q, k, v, out, lse), scale=float(scale), workspace=ws,
                             **masks, **kw)


def softmax_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                     lse: torch.Tensor, dlse: Optional[torch.Tensor], dq: torch.Tensor, dk: torch.Tensor,
                     dv: torch.Tensor, *, scale: float, causal: bool, window_left: int, window_right: int,
                     softcap: float) -> None:
    """Queues the backward: dq, dk, dv (shapes and dtype of q, k, v, any strides) from the forward's
    inputs, its ``out`` and ``lse``, and their gradients ``dout`` and ``dlse`` (None: zero)."""
    kw = _launch_kw(q)
    masks = dict(causal=bool(causal), window_left=int(window_left), window_right=int(window_right),
                 softcap=float(softcap))
    ws, _buf = workspace(plan("backward", q.shape, k.shape, v.shape, dtype=q.dtype, device_info=kw["device_info"],
                              **masks), q.device)
    t = lambda x: pointer_and_strides(x, 4)  # noqa: E731
    module().softmax_backward(t(q), t(k), t(v), t(out), t(dout), pointer_and_strides(lse, 3),
                              pointer_and_strides(dlse, 3), t(dq), t(dk), t(dv), tuple(q.shape), tuple(k.shape),
                              tuple(v.shape), scale=float(scale), workspace=ws, **masks, **kw)
