"""Modules running on pyattn's kernels (``shared/API.md``, "Modules")."""
from .multihead import MultiheadAttention, replace_attention

__all__ = ["MultiheadAttention", "replace_attention"]
