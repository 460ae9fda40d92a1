"""pyattn.bench.flops: exact FLOP and byte counts of each family's formula."""
import pytest

from pyattn.bench.case import Shape
from pyattn.bench.flops import decode_flops, flops, io_bytes, linear_flops, softmax_flops


def shape(b=2, hq=8, hkv=8, sq=1024, sk=1024, d=64, dv=None):
    return Shape(b, hq, hkv, sq, sk, d, d if dv is None else dv)


def test_softmax_forward_is_4_B_H_Sq_Sk_D():
    assert softmax_flops(shape(), False, "fwd") == 4 * 2 * 8 * 1024 * 1024 * 64 == 2 ** 32


@pytest.mark.parametrize("pass_, factor", [("fwd", 1.0), ("bwd", 2.5), ("fwd+bwd", 3.5)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_passes_and_causal_half(pass_, causal, factor):
    assert softmax_flops(shape(), causal, pass_) == 2 ** 32 * factor / (2 if causal else 1)


def test_softmax_counts_the_value_dim_apart():
    # Q K^T over D=64, P V over Dv=32: 2 * B * H * Sq * Sk * (D + Dv)
    assert softmax_flops(shape(b=1, hq=1, hkv=1, sq=3, sk=5, d=64, dv=32), False, "fwd") == 2 * 15 * 96


def test_gqa_counts_query_heads():
    assert softmax_flops(shape(hkv=2), False, "fwd") == softmax_flops(shape(hkv=8), False, "fwd")


def test_decode_counts_the_visible_pairs_bottom_right():
    one = dict(b=1, hq=1, hkv=1, d=1)
    assert decode_flops(shape(sq=4, sk=10, **one), False, "fwd") == 2 * 40 * 2
    assert decode_flops(shape(sq=4, sk=10, **one), True, "fwd") == 2 * (40 - 6) * 2   # rows see 7, 8, 9, 10 keys
    assert decode_flops(shape(sq=4, sk=4, **one), True, "fwd") == 2 * 10 * 2          # = S (S + 1) / 2 pairs
    assert decode_flops(shape(sq=6, sk=4, **one), True, "fwd") == 2 * 10 * 2          # the first 2 rows see none
    # one query sees every key, causal or not
    big = shape(b=1, hq=8, hkv=2, sq=1, sk=4096, d=128)
    assert decode_flops(big, True, "fwd") == decode_flops(big, False, "fwd") == 4 * 8 * 4096 * 128
    assert decode_flops(big, True, "fwd+bwd") == 3.5 * 4 * 8 * 4096 * 128


def test_cross_is_never_causal():
    s = shape(sq=256, sk=8192)
    assert flops("cross", s, True, "fwd") == flops("cross", s, False, "fwd") == 4 * 2 * 8 * 256 * 8192 * 64


def test_linear_chunked_formula():
    s = shape(b=1, hq=1, hkv=1, sq=128, sk=128, d=64)
    # per token: state update + read-out 2 * (2 F Dv), causal blocks 2 * C * (F + Dv) with C = 64
    assert linear_flops(s, True, "fwd") == 128 * (4 * 64 * 64 + 2 * 64 * 128) == 4194304
    assert linear_flops(s, False, "fwd") == 128 * 4 * 64 * 64 == 2097152
    assert linear_flops(s, True, "bwd") == 2 * 4194304
    assert linear_flops(s, True, "fwd+bwd") == 3 * 4194304
    short = shape(b=1, hq=1, hkv=1, sq=16, sk=16, d=64)   # chunk = min(64, S)
    assert linear_flops(short, True, "fwd") == 16 * (4 * 64 * 64 + 2 * 16 * 128)


def test_io_bytes():
    s = shape(b=1, hq=8, hkv=2, sq=1, sk=4096, d=128)
    elements = 8 * 128 + 2 * 2 * 4096 * 128 + 8 * 128     # q, k and v, out
    assert io_bytes(s, 2, "fwd") == 2 * elements == 4198400
    assert io_bytes(s, 2, "bwd") == 2 * 2 * elements
    assert io_bytes(s, 4, "fwd+bwd") == 4 * 3 * elements


def test_unknown_pass_is_refused():
    with pytest.raises(ValueError, match="pass"):
        softmax_flops(shape(), False, "backward")
