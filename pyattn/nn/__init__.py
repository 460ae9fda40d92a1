"""Modules running on pyattn's kernels (``shared/API.md``, "Modules")."""
from .linear import LinearAttention, PerHeadFeatureMap
from .multihead import MultiheadAttention, replace_attention

__all__ = ["MultiheadAttention", "replace_attention", "LinearAttention", "PerHeadFeatureMap"]
