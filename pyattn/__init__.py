"""pyattn: attention kernels for PyTorch.

Four families, each a `torch.library` custom op dispatched per call to a
backend (``pyattn.backends()``): fused softmax attention, linear-recurrent
attention, retrieval-sparse attention and cross-attention. The public
contract is ``shared/API.md``.
"""
from . import feature_maps, integrations, nn, reference
from .dispatch import backends
from .explain import explain
from .ops.cross import cross_attention
from .ops.linear import linear_attention
from .ops.sdpa import scaled_dot_product_attention
from .ops.softmax import attention, attention_varlen
from .ops.sparse import block_sparse_attention, topk_attention
from .retrieval import RetrievalKVCache

__version__ = "0.1.0"

__all__ = [
    "attention", "attention_varlen", "scaled_dot_product_attention", "linear_attention",
    "block_sparse_attention", "topk_attention", "cross_attention", "RetrievalKVCache",
    "backends", "explain", "feature_maps", "integrations", "nn", "reference",
]
