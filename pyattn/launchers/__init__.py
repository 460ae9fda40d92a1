"""Launchers: turn validated tensors into the raw arguments of a compiled kernel.

One module per kernel family and backend (``cpu_softmax``, ``cuda_softmax``, ...).
Launchers never validate: the ops in ``pyattn.ops`` have checked shapes, dtypes,
devices and flags before calling them. They pass data pointers, sizes and element
strides, and write into output buffers the caller allocated.
"""
