"""One mechanism that turns a backend-dispatched op into `torch.library` custom ops.

Each differentiable op `name` becomes two custom ops, ``pyattn::name`` and
``pyattn::name_backward``, both with fake implementations so that
``torch.compile(fullgraph=True)`` traces through them, tied together with
``register_autograd``. The real implementations look up the backend module
by the name passed in (chosen per call in Python, before the op) and call
its ``name_forward`` / ``name_backward``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import dispatch

Tensor = torch.Tensor


def _schema_args(params: Sequence[Tuple[str, str]]) -> str:
    return "".join(f", {kind} {name}" for name, kind in params)


class DifferentiableOp:
    """`inputs`: names of the differentiable tensor inputs (each may be None).
    `params`: (name, schema type) of the other arguments, e.g. ("causal", "bool").
    `fake(*inputs, **params)`: output tensors with the right shapes and dtypes.
    `check_values(*inputs, **params)`: checks of tensor values (index ranges, signs), run in the
    real implementation: there the values exist, in eager mode and in a compiled graph alike.
    """

    def __init__(self, name: str, inputs: Sequence[str], params: Sequence[Tuple[str, str]], num_outputs: int,
                 fake: Callable[..., Tuple[Tensor, ...]], check_values: Optional[Callable[..., None]] = None):
        self.name = name
        self._check_values = check_values
        self.inputs = tuple(inputs)
        self.param_names = tuple(p for p, _ in params)
        self._fake = fake
        tensors = ", ".join(f"Tensor? {n}" for n in inputs)
        outputs = ", ".join(["Tensor"] * num_outputs)
        self.forward_op = torch.library.custom_op(
            f"pyattn::{name}", self._forward, mutates_args=(),
            schema=f"({tensors}{_schema_args(params)}, str backend) -> ({outputs})")
        self.forward_op.register_fake(self._fake_forward)
        self.backward_op = torch.library.custom_op(
            f"pyattn::{name}_backward", self._backward, mutates_args=(),
            schema=f"(Tensor?[] grads, Tensor?[] inputs, Tensor[] outputs, bool[] needs"
                   f"{_schema_args(params)}, str backend) -> Tensor[]")
        self.backward_op.register_fake(self._fake_backward)
        self.forward_op.register_autograd(self._autograd_backward, setup_context=self._setup_context)

    def __call__(self, *inputs: Optional[Tensor], backend: str, **params) -> Tuple[Tensor, ...]:
        return self.forward_op(*inputs, *(params[p] for p in self.param_names), backend)

    # --- real implementations -------------------------------------------------------------
    def _split(self, args):
        n = len(self.inputs)
        return args[:n], dict(zip(self.param_names, args[n:-1])), args[-1]

    def _forward(self, *args):
        inputs, params, backend = self._split(args)
        if self._check_values is not None:
            self._check_values(*inputs, **params)
        outputs = getattr(dispatch.get(backend), f"{self.name}_forward")(inputs, **params)
        return tuple(o.contiguous() for o in outputs)

    def _backward(self, grads, inputs, outputs, needs, *args):
        params, backend = dict(zip(self.param_names, args[:-1])), args[-1]
        found = getattr(dispatch.get(backend), f"{self.name}_backward")(
            tuple(grads), tuple(inputs), tuple(outputs), tuple(needs), **params)
        anchor = outputs[0]
        result = []
        for g, x, need in zip(found, inputs, needs):
            if need and x is not None:
                g = g.contiguous()
                # custom ops may not return a tensor that aliases an input
                result.append(g.clone() if any(g is t for t in (*grads, *inputs)) else g)
            else:
                result.append(anchor.new_empty(0))
        return result

    # --- fakes (shapes only) --------------------------------------------------------------
    def _fake_forward(self, *args):
        inputs, params, _ = self._split(args)
        return self._fake(*inputs, **params)

    def _fake_backward(self, grads, inputs, outputs, needs, *args):
        anchor = outputs[0]
        return [torch.empty(x.shape, dtype=x.dtype, device=x.device) if need and x is not None
                else anchor.new_empty(0) for x, need in zip(inputs, needs)]

    # --- autograd -------------------------------------------------------------------------
    def _setup_context(self, ctx, inputs, output):
        n = len(self.inputs)
        params = inputs[n:-1]
        tensor_params = [i for i, p in enumerate(params) if isinstance(p, Tensor)]
        ctx.save_for_backward(*inputs[:n], *output, *(params[i] for i in tensor_params))
        ctx.num_outputs = len(output)
        ctx.tensor_params = tensor_params
        ctx.params = [None if i in tensor_params else p for i, p in enumerate(params)]
        ctx.backend = inputs[-1]

    def _autograd_backward(self, ctx, *grads):
        n = len(self.inputs)
        saved = ctx.saved_tensors
        inputs, outputs = saved[:n], saved[n:n + ctx.num_outputs]
        params = list(ctx.params)
        for i, t in zip(ctx.tensor_params, saved[n + ctx.num_outputs:]):
            params[i] = t
        needs = [bool(x) for x in ctx.needs_input_grad[:n]]
        grads = [torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs)]
        found: List[Tensor] = self.backward_op(grads, list(inputs), list(outputs), needs, *params, ctx.backend)
        result = [g if need else None for g, need in zip(found, needs)]
        return (*result, *([None] * (len(ctx.needs_input_grad) - n)))
