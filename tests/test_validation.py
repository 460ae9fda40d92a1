"""Every malformed input gets a ValueError/TypeError naming the argument, before any kernel runs."""
import pytest
import torch

import pyattn

B, HQ, HKV, S, D = 2, 4, 2, 8, 16


def t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


Q, K, V = t(B, HQ, S, D), t(B, HKV, S, D), t(B, HKV, S, D)
QP, KP, VP = t(10, HQ, D), t(12, HKV, D), t(12, HKV, D)
CU_Q = torch.tensor([0, 4, 10], dtype=torch.int32)
CU_K = torch.tensor([0, 5, 12], dtype=torch.int32)
BI = torch.zeros(B, HKV, 2, 1, dtype=torch.int32)  # block_size 4 -> 2 query blocks


def call_with(fn, positional, defaults):
    """A call of `fn` with `defaults` overridden: names in `positional` go by position, the rest by keyword."""
    def make(**overrides):
        args = dict(defaults, **overrides)
        return lambda: fn(*(args[n] for n in positional), **{n: a for n, a in args.items() if n not in positional})
    return make


QKV = ("q", "k", "v")
attn = call_with(pyattn.attention, QKV, dict(q=Q, k=K, v=V))
varlen = call_with(pyattn.attention_varlen, QKV + ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"),
                   dict(q=QP, k=KP, v=VP, cu_seqlens_q=CU_Q, cu_seqlens_k=CU_K, max_seqlen_q=6, max_seqlen_k=7))
linear = call_with(pyattn.linear_attention, QKV, dict(q=Q, k=K, v=V))
sparse = call_with(pyattn.block_sparse_attention, QKV + ("block_indices",),
                   dict(q=Q, k=K, v=V, block_indices=BI, block_size=4))
topk = call_with(pyattn.topk_attention, QKV, dict(q=Q, k=K, v=V, top_k=1, block_size=4))
cross = call_with(pyattn.cross_attention, QKV, dict(q=Q, k=K, v=V))


STATE = (torch.zeros(B, HQ, D, D), torch.zeros(B, HQ, D))

CASES = [
    # (id, call, error type, words the message must contain)
    ("q-not-tensor", attn(q=Q.numpy()), TypeError, ["q", "torch.Tensor"]),
    ("q-rank", attn(q=t(HQ, S, D)), ValueError, ["q", "4 dimensions", "(4, 8, 16)"]),
    ("k-rank", attn(k=t(B, S, D)), ValueError, ["k", "4 dimensions"]),
    ("q-int-dtype", attn(q=Q.int()), TypeError, ["q", "dtype", "torch.int32"]),
    ("k-dtype-mismatch", attn(k=K.double()), TypeError, ["k", "torch.float64", "torch.float32"]),
    ("v-device-mismatch", attn(v=V.to("meta")), ValueError, ["v", "device", "meta"]),
    ("batch-mismatch", attn(k=t(3, HKV, S, D), v=t(3, HKV, S, D)), ValueError, ["batch", "3"]),
    ("heads-not-multiple", attn(q=t(B, 3, S, D)), ValueError, ["heads", "q", "3", "2"]),
    ("v-heads", attn(v=t(B, 1, S, D)), ValueError, ["v", "heads", "1"]),
    ("v-seq", attn(v=t(B, HKV, S + 1, D)), ValueError, ["v", "sequence length", "9"]),
    ("k-head-dim", attn(k=t(B, HKV, S, D + 1), v=t(B, HKV, S, D + 1)), ValueError, ["k", "head_dim", "17"]),
    ("zero-head-dim", attn(q=t(B, HQ, S, 0), k=t(B, HKV, S, 0)), ValueError, ["head_dim", "0"]),
    ("scale-type", attn(scale="0.1"), TypeError, ["scale", "str"]),
    ("scale-nan", attn(scale=float("nan")), ValueError, ["scale", "nan"]),
    ("causal-type", attn(causal=1), TypeError, ["causal", "bool"]),
    ("window-type", attn(window=3), TypeError, ["window", "pair"]),
    ("window-value", attn(window=(-2, 0)), ValueError, ["window", "left", "-2"]),
    ("window-float", attn(window=(1.5, 0)), TypeError, ["window", "left", "float"]),
    ("window-huge", attn(window=(0, 2**63)), ValueError, ["window", "right", str(2**63)]),
    ("softcap-negative", attn(softcap=-1.0), ValueError, ["softcap", "-1.0"]),
    ("dropout-1", attn(dropout_p=1.0), ValueError, ["dropout_p", "1.0"]),
    ("dropout-negative", attn(dropout_p=-0.1), ValueError, ["dropout_p", "-0.1"]),
    ("bias-shape", attn(attn_bias=t(S, S + 1)), ValueError, ["attn_bias", "(8, 9)", "broadcast"]),
    ("bias-rank", attn(attn_bias=t(1, B, HQ, S, S)), ValueError, ["attn_bias", "broadcast"]),
    ("bias-dtype", attn(attn_bias=torch.zeros(S, S, dtype=torch.int64)), TypeError, ["attn_bias", "int64"]),
    ("bias-not-tensor", attn(attn_bias=0.5), TypeError, ["attn_bias", "float"]),
    ("return-lse-type", attn(return_lse="yes"), TypeError, ["return_lse", "bool"]),
    ("backend-unknown", attn(backend="cudnn"), ValueError, ["backend", "cudnn", "reference"]),
    ("backend-type", attn(backend=3), ValueError, ["backend", "3"]),
    # varlen
    ("varlen-rank", varlen(q=Q), ValueError, ["q", "3 dimensions"]),
    ("cu-dtype", varlen(cu_seqlens_q=CU_Q.long()), TypeError, ["cu_seqlens_q", "int64", "int32"]),
    ("cu-rank", varlen(cu_seqlens_k=CU_K[None]), ValueError, ["cu_seqlens_k", "1 dimensions"]),
    ("cu-end", varlen(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError,
     ["cu_seqlens_q", "10", "9"]),
    ("cu-start", varlen(cu_seqlens_k=torch.tensor([1, 5, 12], dtype=torch.int32)), ValueError,
     ["cu_seqlens_k", "start at 0"]),
    ("cu-decreasing", varlen(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                             cu_seqlens_k=torch.tensor([0, 5, 6, 12], dtype=torch.int32)), ValueError,
     ["cu_seqlens_q", "non-decreasing"]),
    ("cu-batch-mismatch", varlen(cu_seqlens_k=torch.tensor([0, 12], dtype=torch.int32)), ValueError,
     ["cu_seqlens_k", "length", "3"]),
    ("max-seqlen-small", varlen(max_seqlen_q=5), ValueError, ["max_seqlen_q", "5", "6"]),
    ("max-seqlen-type", varlen(max_seqlen_k=7.0), TypeError, ["max_seqlen_k", "float"]),
    # linear
    ("feature-map-name", linear(feature_map="softmax"), ValueError, ["feature_map", "softmax"]),
    ("feature-map-type", linear(feature_map=3), TypeError, ["feature_map", "int"]),
    ("feature-map-output", linear(feature_map=lambda x: x[..., 0]), ValueError, ["feature_map(q)", "4 dimensions"]),
    ("linear-seq-mismatch", linear(k=t(B, HKV, S + 1, D), v=t(B, HKV, S + 1, D)), ValueError,
     ["k", "sequence length", "linear"]),
    ("decay-positive", linear(log_decay=0.5), ValueError, ["log_decay", "<= 0", "0.5"]),
    ("decay-tensor-positive", linear(log_decay=torch.full((HQ,), 0.1)), ValueError, ["log_decay", "<= 0"]),
    ("decay-shape", linear(log_decay=torch.zeros(B, HQ)), ValueError, ["log_decay", "(2, 4)", "(2, 4, 8)"]),
    ("decay-type", linear(log_decay="fast"), TypeError, ["log_decay", "str"]),
    ("decay-noncausal", linear(log_decay=-0.1, causal=False), ValueError, ["log_decay", "causal"]),
    ("state-not-tuple", linear(initial_state=STATE[0]), TypeError, ["initial_state", "tuple"]),
    ("state-shape", linear(initial_state=(torch.zeros(B, HQ, D, D + 1), STATE[1])), ValueError,
     ["initial_state[0]", "(2, 4, 16, 16)", "(2, 4, 16, 17)"]),
    ("state-dtype", linear(initial_state=(STATE[0].half(), STATE[1])), TypeError, ["initial_state[0]", "float16"]),
    ("eps-negative", linear(eps=-1e-6), ValueError, ["eps"]),
    ("normalize-type", linear(normalize=None), TypeError, ["normalize", "bool"]),
    # block-sparse / top-k
    ("bi-dtype", sparse(block_indices=BI.long()), TypeError, ["block_indices", "int64", "int32"]),
    ("bi-shape", sparse(block_indices=torch.zeros(B, HKV, 3, 1, dtype=torch.int32)), ValueError,
     ["block_indices", "(2, 2, 2, n_sel)", "(2, 2, 3, 1)"]),
    ("bi-rank", sparse(block_indices=torch.zeros(B, HKV, 2, dtype=torch.int32)), ValueError,
     ["block_indices", "4 dimensions"]),
    ("bi-value-high", sparse(block_indices=torch.full((B, HKV, 2, 1), 2, dtype=torch.int32)), ValueError,
     ["block_indices", "[2, 2]", "< 2"]),
    ("bi-value-low", sparse(block_indices=torch.full((B, HKV, 2, 1), -2, dtype=torch.int32)), ValueError,
     ["block_indices", "-2"]),
    ("block-size-zero", sparse(block_size=0), ValueError, ["block_size", "0"]),
    ("topk-negative", topk(top_k=-1), ValueError, ["top_k", "-1"]),
    ("topk-type", topk(top_k=1.0), TypeError, ["top_k", "float"]),
    ("topk-huge", topk(top_k=2**63), ValueError, ["top_k", str(2**63)]),
    ("sinks-negative", topk(num_sink_blocks=-1), ValueError, ["num_sink_blocks", "-1"]),
    ("locals-type", topk(num_local_blocks=None), TypeError, ["num_local_blocks", "NoneType"]),
    # cross
    ("kv-lengths-dtype", cross(kv_lengths=torch.tensor([1.0, 2.0])), TypeError, ["kv_lengths", "float32"]),
    ("kv-lengths-shape", cross(kv_lengths=torch.tensor([1, 2, 3])), ValueError, ["kv_lengths", "(3,)"]),
    ("kv-lengths-value", cross(kv_lengths=torch.tensor([1, 9])), ValueError, ["kv_lengths", "9", "seq_k=8"]),
    ("kv-lengths-negative", cross(kv_lengths=torch.tensor([-1, 2])), ValueError, ["kv_lengths", "-1"]),
    ("padding-dtype", cross(key_padding_mask=torch.zeros(B, S)), TypeError, ["key_padding_mask", "float32", "bool"]),
    ("padding-shape", cross(key_padding_mask=torch.zeros(B, S + 1, dtype=torch.bool)), ValueError,
     ["key_padding_mask", "(2, 9)"]),
]


@pytest.mark.parametrize("call,error,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_named(call, error, words, no_default_backend):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_env_backend_unknown_is_named(monkeypatch):
    monkeypatch.setenv("PYATTN_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYATTN_BACKEND.*fastest"):
        pyattn.attention(Q, K, V)


SDPA_CASES = {
    # id: (kv heads, keyword arguments, words of the message)
    "q-dtype": (HQ, dict(q_dtype=torch.float64), ["dtype"]),
    "gqa-no-flag": (HKV, {}, ["size"]),
    "mask-shape": (HQ, dict(attn_mask=torch.ones(S, S + 1, dtype=torch.bool)), ["broadcast"]),
    "mask-dtype": (HQ, dict(attn_mask=torch.ones(S, S, dtype=torch.int32)), ["attn_mask", "dtype"]),
}


@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_rejects_what_torch_rejects(case):
    hkv, kwargs, words = SDPA_CASES[case]
    kwargs = dict(kwargs)
    q, k, v = t(B, HQ, S, D, dtype=kwargs.pop("q_dtype", torch.float32)), t(B, hkv, S, D), t(B, hkv, S, D)
    with pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError) as ours:
        pyattn.scaled_dot_product_attention(q, k, v, **kwargs)
    assert isinstance(ours.value, RuntimeError)
    for word in words:
        assert word in str(ours.value)


def test_sdpa_mask_with_is_causal_is_rejected_as_documented():
    # torch documents the error; its CPU fused kernel happens not to raise it, its meta and math paths do
    q = t(B, HQ, S, D)
    with pytest.raises(ValueError, match="is_causal"):
        pyattn.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(S, S, dtype=torch.bool), is_causal=True)
