"""`MultiheadAttention`: `torch.nn.MultiheadAttention` with its attention on `pyattn.attention`.

The forward follows torch's ``nn.MultiheadAttention.forward`` and
``F.multi_head_attention_forward`` step by step (mask canonicalisation and
merging, the ``is_causal`` hint, ``bias_k``/``bias_v``, ``add_zero_attn``, the
shape checks), reusing torch's private helpers where they exist so that
warnings and errors are torch's own. Only the attention itself differs:

* ``need_weights=False`` runs `pyattn.attention`. As in torch's SDPA call, a
  query row whose keys are all masked gives zeros (torch's fused inference
  path, below, gives NaN there instead: torch disagrees with itself).
* ``need_weights=True`` must return the softmax weights, which a fused kernel
  never forms, so it runs torch's plain math, as torch's own module does
  (fully masked rows are NaN there, in torch too).

torch's fused inference path (``torch._native_multi_head_attention``) is never
taken: every call runs the steps above.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.softmax import attention


def _keep_forward(module, args):
    """A no-op forward pre-hook: its presence turns off TransformerEncoderLayer's fused inference path.

    That path reads ``self_attn``'s weights and calls torch's kernel without
    calling ``self_attn``; torch skips it when any submodule has hooks.
    """
    return None


def _same_identity_transpose(query, key, value):
    """(N, L, E) -> (L, N, E), keeping ``query is key is value`` as torch does (it picks the packed projection)."""
    if key is value:
        if query is key:
            query = key = value = query.transpose(1, 0)
        else:
            query, key = (x.transpose(1, 0) for x in (query, key))
            value = key
    else:
        query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    return query, key, value


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for `torch.nn.MultiheadAttention` running on pyattn's kernels.

    Same constructor, parameters (state_dict keys), forward, outputs, warnings
    and errors; see the module docstring for how the attention runs.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first, device=device,
                         dtype=dtype)
        self.register_forward_pre_hook(_keep_forward)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention) -> "MultiheadAttention":
        """Convert `mha`: same configuration, training mode and parameters.

        The new module shares `mha`'s Parameter objects (and its ``out_proj``),
        as ``nn.SyncBatchNorm.convert_sync_batchnorm`` does, so an optimizer or
        tied weights keep working after `replace_attention`; deep-copy `mha`
        first for an independent module.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
        new = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                  add_bias_kv=mha.bias_k is not None, add_zero_attn=mha.add_zero_attn, kdim=mha.kdim,
                  vdim=mha.vdim, batch_first=mha.batch_first, device="meta")  # meta: no wasted init
        for name in new._parameters:
            setattr(new, name, getattr(mha, name))
        new.out_proj = mha.out_proj
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """As `torch.nn.MultiheadAttention.forward`."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise AssertionError(
                "pyattn.nn.MultiheadAttention does not support NestedTensor (torch's takes it only on its fused "
                "inference path); in a TransformerEncoder set use_nested_tensor = False, as replace_attention does")
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:
            query, key, value = _same_identity_transpose(query, key, value)
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights

    def _attend(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                is_causal):
        """`F.multi_head_attention_forward` on (L, N, E) inputs, the attention on pyattn."""
        num_heads = self.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                               "method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # torch trusts the hint: the mask is neither checked nor used
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask is no longer causal
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        head_dim = embed_dim // num_heads

        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
            q, k, v = F._in_projection_packed(query, key, value, self.in_proj_weight, self.in_proj_bias)
        else:
            if key.shape[:2] != value.shape[:2]:
                raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                     f"{value.shape[:2]}")
            biases = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            q, k, v = F._in_projection(query, key, value, self.q_proj_weight, self.k_proj_weight,
                                       self.v_proj_weight, *biases)

        if attn_mask is not None:
            expected = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * num_heads, tgt_len, src_len)
            if attn_mask.shape != expected:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is {attn_mask.shape}, but should "
                                   f"be {expected}.")
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask

        if self.bias_k is not None:  # one extra key and value, appended along the sequence
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))

        q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)

        if self.add_zero_attn:  # one more key and value, all zeros
            zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.size(1)

        if key_padding_mask is not None:
            for dim, size in enumerate((bsz, src_len)):  # torch's F._check_key_padding_mask breaks torch.compile graphs
                if key_padding_mask.shape[dim] != size:
                    raise AssertionError(f"Expected key_padded_mask.shape[{dim}] to be {size}, but got "
                                         f"{key_padding_mask.shape[dim]}")
            key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                                .reshape(bsz * num_heads, 1, src_len))
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask

        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, attn_mask, dropout_p)
            out = out.view(bsz, num_heads, tgt_len, head_dim)
            weights = weights.view(bsz, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            q = q.view(bsz, num_heads, tgt_len, head_dim)
            k = k.view(bsz, num_heads, src_len, head_dim)
            v = v.view(bsz, num_heads, src_len, head_dim)
            if attn_mask is not None:  # (1 or bsz * heads, L, S) -> broadcastable to (bsz, heads, L, S)
                attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 else attn_mask.view(
                    bsz, num_heads, -1, src_len)
            out, weights = _pyattn_attention(q, k, v, attn_mask, dropout_p, is_causal), None

        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        if not is_batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


def _attention_with_weights(q, k, v, attn_mask, dropout_p):
    """torch's math for ``need_weights=True``: q, k, v (N*H, L|S, D) -> out (N*H, L, D), weights (N*H, L, S)."""
    q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
    if attn_mask is not None:
        weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
    else:
        weights = torch.bmm(q_scaled, k.transpose(-2, -1))
    weights = F.softmax(weights, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.bmm(weights, v), weights


def _pyattn_attention(q, k, v, attn_mask, dropout_p, is_causal):
    """What torch's ``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)`` gives, on pyattn."""
    if attn_mask is not None and attn_mask.dtype not in (q.dtype, torch.float32):
        # torch's SDPA rejects this mask: let it raise, on free meta copies, with its own message
        F.scaled_dot_product_attention(*(torch.empty_like(x, device="meta") for x in (q, k, v, attn_mask)))
    if attn_mask is not None and q.dtype == torch.float64:
        attn_mask = attn_mask.to(q.dtype)  # torch takes a float32 mask for any query; pyattn's float64 wants float64
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    causal = bool(is_causal)
    if causal and q.shape[2] != k.shape[2]:
        # torch aligns is_causal top-left, pyattn bottom-right: they agree only on square masks
        attn_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        causal = False
    if dropout_p == 1.0:  # pyattn takes dropout_p < 1; dropping every weight leaves zeros
        return attention(q, k, v, causal=causal, attn_bias=attn_mask) * 0.0
    return attention(q, k, v, causal=causal, attn_bias=attn_mask, dropout_p=float(dropout_p))


def replace_attention(model: nn.Module) -> nn.Module:
    """Swap every `torch.nn.MultiheadAttention` in `model` for pyattn's, in place; returns `model`.

    Only modules of exactly torch's class are swapped: a subclass may have its
    own forward or parameters (torch.ao's quantizable one does). A module that
    several parents share becomes one shared pyattn module. A TransformerEncoder
    holding a swapped layer stops turning padded input into NestedTensors
    (``use_nested_tensor = False``): that inference path never calls
    ``self_attn``. If `model` is itself torch's module, its conversion is returned.
    """
    if type(model) is nn.MultiheadAttention:
        return MultiheadAttention.from_torch(model)
    converted = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MultiheadAttention:
                if id(child) not in converted:
                    converted[id(child)] = MultiheadAttention.from_torch(child)
                setattr(parent, name, converted[id(child)])
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), MultiheadAttention) for layer in module.layers):
            module.use_nested_tensor = False
    return model
