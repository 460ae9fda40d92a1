"""The host side of the CUDA backend, on a machine without a GPU: the launch plans (the switch tree,
head-dim buckets, grids within the hardware limits, shared memory, split-KV decoding's key splits,
workspaces), the split merge arithmetic of decoding, the launcher's refusals, the verification record
and how `backend=None` reads it. The kernels themselves run in tests/test_cuda_kernels.py (`-m gpu`).
"""
from __future__ import annotations

import math

import pytest
import torch

import pyattn
from pyattn import _extension, dispatch
from pyattn.dispatch import cuda as cuda_backend
from pyattn.dispatch import cuda_registry

cpu_module = _extension.load_cpu()  # first, as in most processes: both modules must load side by side
cuda = _extension.load_cuda()
REASON = _extension.cuda_unavailable_reason()
# Only a build without nvcc skips; a module that was built but does not import fails every test.
pytestmark = pytest.mark.skipif(REASON is not None and "not built" in REASON, reason=f"pyattn._cuda: {REASON}")

H100 = (9, 0, 132, 227 * 1024)  # (major, minor, multiprocessors, max opt-in shared memory per block)
A100 = (8, 0, 108, 163 * 1024)
DEVICES = {"H100": H100, "A100": A100}
BF16, F16, F32 = 2, 1, 0


def softmax_plan(direction, b, hq, hkv, sq, sk, d, dv=None, *, dtype=BF16, device=H100, causal=False,
                 window=(-1, -1), softcap=0.0):
    dv = d if dv is None else dv
    return cuda.plan_softmax(direction, (b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, dv), causal=causal,
                             window_left=window[0], window_right=window[1], softcap=softcap, dtype=dtype,
                             device_info=device)


def linear_plan(direction, b, hq, hkv, s, f, dv, *, dtype=BF16, device=H100, causal=True, decay=False,
                state=False):
    args = cuda.LinearArgs(sizes=(b, hq, hkv, s, f, dv), dtype=dtype, feature_map=1, causal=causal, normalize=True,
                           scale=1.0, eps=1e-6)
    return cuda.plan_linear(direction, args, has_decay=decay, has_initial_state=state, has_final_state=True,
                            device_info=device)


def assert_launchable(plan, device=H100):
    """What every runnable plan must satisfy on the device it was made for."""
    assert plan["error"] is None, plan
    gx, gy, gz = plan["grid"]
    assert 1 <= gx <= 2**31 - 1 and 1 <= gy <= 65535 and 1 <= gz <= 65535, plan
    assert 32 <= plan["block"] <= 1024 and plan["block"] % 32 == 0, plan
    assert 0 <= plan["smem_bytes"] <= device[3], plan
    assert plan["workspace_floats"] >= 0 and plan["num_splits"] >= 1, plan
    assert plan["kernel"] in cuda_registry.KERNELS


def test_module_imports_beside_the_cpu_module():
    assert cuda is not None and cpu_module is not None, REASON
    assert cpu_module.LinearArgs is not cuda.LinearArgs


# --------------------------------------------------------------------------- the switch tree

@pytest.mark.parametrize("sq,dtype,kernel", [
    (1, BF16, "softmax_decode"), (16, F16, "softmax_decode"), (16, F32, "softmax_decode"),
    (17, BF16, "softmax_fwd_mma"), (4096, F16, "softmax_fwd_mma"), (17, F32, "softmax_fwd_simt"),
    (4096, F32, "softmax_fwd_simt")])
def test_softmax_forward_kernel_choice(sq, dtype, kernel):
    plan = softmax_plan("forward", 2, 8, 2, sq, 4096, 128, dtype=dtype, causal=True)
    assert plan["kernel"] == kernel
    assert_launchable(plan)


@pytest.mark.parametrize("d,bucket", [(1, 64), (32, 64), (64, 64), (65, 128), (80, 128), (96, 128), (128, 128),
                                      (129, 256), (200, 256), (256, 256)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_head_dim_buckets(d, bucket, direction):
    assert cuda.head_dim_bucket(d) == bucket
    for sq in (1, 1000):
        plan = softmax_plan(direction, 1, 4, 4, sq, 1000, d)
        assert plan["head_dim_bucket"] == bucket
        assert_launchable(plan)


def test_the_bucket_is_that_of_the_larger_head_dim():
    assert softmax_plan("forward", 1, 2, 2, 100, 100, 64, 200)["head_dim_bucket"] == 256
    assert softmax_plan("backward", 1, 2, 2, 100, 100, 200, 64)["head_dim_bucket"] == 256


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_head_dims_past_every_bucket_are_refused(direction):
    assert cuda.head_dim_bucket(257) == 0
    for sq in (1, 1000):
        plan = softmax_plan(direction, 1, 2, 2, sq, 100, 320)
        assert plan["error"], plan


def test_float32_has_no_cuda_backward():
    assert softmax_plan("backward", 1, 2, 2, 100, 100, 64, dtype=F32)["error"]


def test_tensor_cores_need_sm80():
    plan = softmax_plan("forward", 1, 2, 2, 100, 100, 64, device=(7, 5, 40, 64 * 1024))
    assert plan["error"] and plan["kernel"] == "softmax_fwd_mma"


@pytest.mark.parametrize("device", list(DEVICES))
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 17, 1, 64), (100000, 64, 8, 4096, 4096, 128),  # B*H*blocks > 2^24
                                   (3, 40, 5, 1000, 1, 256), (1, 1, 1, 1, 2**20, 64), (70000, 2, 1, 1, 512, 128)])
def test_grids_stay_within_hardware_limits(shape, direction, device):
    plan = softmax_plan(direction, *shape, device=DEVICES[device], causal=True)
    assert_launchable(plan, DEVICES[device])


def test_backward_workspace_holds_a_float32_dq():
    b, hq, sq, d = 2, 8, 1000, 128
    plan = softmax_plan("backward", b, hq, 2, sq, 1000, d)
    assert plan["workspace_floats"] >= b * hq * sq * d


# --------------------------------------------------------------------------- split-KV decoding

@pytest.mark.parametrize("b,hq,hkv,sq,sk", [(1, 32, 8, 1, 100), (1, 32, 8, 1, 128 * 1024), (64, 32, 8, 1, 128 * 1024),
                                          (1, 1, 1, 16, 2**20), (8, 64, 64, 4, 4096), (1, 8, 1, 1, 0)])
def test_decode_splits_and_workspace(b, hq, hkv, sq, sk):
    plan = softmax_plan("forward", b, hq, hkv, sq, sk, 128, causal=True)
    assert plan["kernel"] == "softmax_decode"
    assert_launchable(plan)
    splits = plan["num_splits"]
    assert splits <= max(sk, 1)
    if splits > 1:  # partial outputs and lse of every split, row and value column
        assert plan["workspace_floats"] >= splits * b * hq * sq * (128 + 1)
    else:
        assert plan["workspace_floats"] == 0


def test_decode_splits_long_keys_over_few_heads_more():
    few = softmax_plan("forward", 1, 8, 1, 1, 256 * 1024, 128)["num_splits"]
    many = softmax_plan("forward", 128, 32, 8, 1, 256 * 1024, 128)["num_splits"]
    short = softmax_plan("forward", 1, 8, 1, 1, 64, 128)["num_splits"]
    assert few > 1 and few >= many and short == 1


def _merge(part_lse: torch.Tensor, part_out: torch.Tensor):
    splits, rows, dv = part_out.shape
    lse, out = torch.empty(rows), torch.empty(rows, dv)
    cuda.merge_split_rows(splits, rows, dv, part_lse.data_ptr(), part_out.data_ptr(), lse.data_ptr(), out.data_ptr())
    return lse, out


def test_merge_split_rows_equals_one_softmax_over_all_keys():
    """Per split: the softmax over its keys (lse_s, o_s); merged: the softmax over all of them."""
    gen = torch.Generator().manual_seed(0)
    splits, rows, keys, dv = 5, 7, 40, 33
    scores = torch.randn(rows, splits * keys, generator=gen, dtype=torch.float64) * 3
    scores[2, :keys * 3] = -math.inf  # splits 0-2 see nothing in row 2
    scores[5] = -math.inf  # row 5 sees no key at all
    values = torch.randn(splits * keys, dv, generator=gen, dtype=torch.float64)
    part_lse = torch.logsumexp(scores.view(rows, splits, keys), -1).T.contiguous()  # (splits, rows)
    probs = torch.softmax(scores.view(rows, splits, keys), -1).nan_to_num(0.0)
    part_out = torch.einsum("rsk,skd->srd", probs, values.view(splits, keys, dv)).contiguous()
    lse, out = _merge(part_lse.float(), part_out.float())
    want_lse = torch.logsumexp(scores, -1)
    want_out = (torch.softmax(scores, -1).nan_to_num(0.0) @ values)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    assert lse[5] == -math.inf and (out[5] == 0).all() and torch.isfinite(out).all()


def test_merge_of_one_split_is_the_identity():
    lse, out = _merge(torch.tensor([[0.5, -math.inf]]), torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))
    assert lse.tolist() == [0.5, -math.inf] and out.tolist() == [[1.0, 2.0], [0.0, 0.0]]


# --------------------------------------------------------------------------- linear attention

@pytest.mark.parametrize("s,kernel", [(0, "linear_recurrent_fwd"), (1, "linear_recurrent_fwd"),
                                      (16, "linear_recurrent_fwd"), (17, "linear_chunk_fwd"),
                                      (100000, "linear_chunk_fwd")])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_linear_forward_kernel_choice(s, kernel, dtype):
    plan = linear_plan("forward", 2, 8, 2, s, 64, 64, dtype=dtype, decay=True, state=True)
    assert plan["kernel"] == kernel
    if s:
        assert_launchable(plan)


@pytest.mark.parametrize("f,dv,bucket", [(1, 1, 64), (32, 80, 128), (64, 64, 64), (128, 48, 128), (100, 128, 128)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_buckets(f, dv, bucket, direction):
    for s in (5, 3000):
        plan = linear_plan(direction, 3, 4, 2, s, f, dv, decay=True, state=True)
        assert plan["head_dim_bucket"] == bucket
        assert_launchable(plan)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_refusals(direction):
    assert linear_plan(direction, 1, 2, 2, 100, 64, 64, causal=False)["error"]
    assert linear_plan(direction, 1, 2, 2, 100, 129, 64)["error"]
    assert linear_plan(direction, 1, 2, 2, 100, 64, 256)["error"]


@pytest.mark.parametrize("shape", [(100000, 64, 8, 4096, 128, 128), (1, 1, 1, 100000, 1, 1), (70000, 2, 1, 1, 64, 64)])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_linear_grids_stay_within_hardware_limits(shape, direction):
    assert_launchable(linear_plan(direction, *shape, decay=True, state=True))


# --------------------------------------------------------------------------- the launcher's refusals

def test_launcher_reports_the_plan_error_before_touching_a_gpu():
    size = (1, 2, 100, 320)
    with pytest.raises(RuntimeError, match="softmax_forward"):
        cuda.softmax_forward(0, 0, 0, 0, 0, size, (0, 0, 0, 0), size, (0, 0, 0, 0), size, (0, 0, 0, 0),
                             (0, 0, 0, 0), (0, 0, 0), scale=1.0, causal=False, window_left=-1, window_right=-1,
                             softcap=0.0, dtype=BF16, device_info=H100, device=0, stream=0, workspace=(0, 0))


def test_launcher_refuses_a_short_workspace():
    size, zero = (2, 8, 1000, 128), (0, 0, 0, 0)
    plan = softmax_plan("backward", 2, 8, 8, 1000, 1000, 128)
    assert plan["workspace_floats"] > 0
    t = (0, zero)
    with pytest.raises(RuntimeError, match="workspace"):
        cuda.softmax_backward(t, t, t, t, t, (0, (0, 0, 0)), (0, (0, 0, 0)), t, t, t, size, size, size, scale=1.0,
                              causal=True, window_left=-1, window_right=-1, softcap=0.0, dtype=BF16,
                              device_info=H100, device=0, stream=0, workspace=(0, plan["workspace_floats"] - 1))


def test_bindings_check_their_codes():
    with pytest.raises(ValueError, match="dtype"):
        softmax_plan("forward", 1, 2, 2, 10, 10, 64, dtype=7)
    with pytest.raises(ValueError, match="direction"):
        softmax_plan("sideways", 1, 2, 2, 10, 10, 64)
    with pytest.raises(ValueError, match="multiprocessor"):
        softmax_plan("forward", 1, 2, 2, 10, 10, 64, device=(9, 0, 0, 1024))


# --------------------------------------------------------------------------- the verification record

def test_committed_record_covers_every_kernel():
    records = cuda_registry.load()
    assert set(records) == set(cuda_registry.KERNELS)
    for record in records.values():
        assert record["status"] in ("unverified", "passed", "failed")
    status = pyattn.backends()["cuda"]
    assert set(status.kernels) == set(cuda_registry.KERNELS)
    assert status.default_ok == any(cuda_registry.passed(r) for r in records.values())


ENV = dict(device="NVIDIA H100", date="2026-11-23", torch="2.11.0+cu130", cuda="13.0", commit="abc")


def test_summarize_tests():
    outcomes = [(("softmax_fwd_mma", "softmax_bwd_mma"), True, False, "t1"),
                (("softmax_fwd_mma",), True, False, "t2"),
                (("softmax_decode",), False, False, "t3"),
                (("softmax_decode", "linear_chunk_fwd"), True, False, "t4"),
                (("softmax_fwd_mma", "softmax_decode"), True, True, "sanitizer")]
    previous = {"linear_chunk_bwd": {"status": "passed", "device": "old"}}
    records = cuda_registry.summarize_tests(outcomes, previous=previous, environment=ENV)
    assert records["softmax_fwd_mma"]["status"] == "passed" and records["softmax_fwd_mma"]["tests_passed"] == 3
    assert records["softmax_fwd_mma"]["device"] == "NVIDIA H100"
    assert records["softmax_decode"]["status"] == "failed" and records["softmax_decode"]["failed_tests"] == ["t3"]
    assert records["softmax_bwd_mma"]["status"] == "unverified"  # passed, but no sanitizer run covered it
    assert records["linear_chunk_bwd"] == {"status": "passed", "device": "old"}  # not exercised: kept
    assert records["linear_recurrent_fwd"]["status"] == "unverified"
    with pytest.raises(ValueError, match="unknown"):
        cuda_registry.summarize_tests([(("nope",), True, False, "t")], previous={}, environment=ENV)


def test_summarize_speed_merges_winning_lengths():
    row = dict(kernel="softmax_fwd_mma", direction="forward", dtype="bfloat16", head_dim_bucket=128, causal=True)
    rows = [dict(row, seq=1024, cuda_ms=1.0, triton_ms=1.2), dict(row, seq=2048, cuda_ms=2.0, triton_ms=2.1),
            dict(row, seq=4096, cuda_ms=4.0, triton_ms=3.9), dict(row, seq=8192, cuda_ms=7.0, triton_ms=8.0)]
    ranges = cuda_registry.summarize_speed(rows)
    assert [(r["seq_min"], r["seq_max"]) for r in ranges] == [(1024, 2048), (8192, 8192)]
    assert ranges[0]["min_speedup"] == 1.05
    record = {"status": "passed", "faster_than_triton": ranges}
    call = dict(direction="forward", dtype="bfloat16", head_dim_bucket=128, causal=True)
    assert cuda_registry.faster_than_triton(record, seq=1500, **call)
    assert not cuda_registry.faster_than_triton(record, seq=4096, **call)
    assert not cuda_registry.faster_than_triton(record, seq=1500, **dict(call, causal=False))


def test_write_then_load(tmp_path):
    path = tmp_path / "record.json"
    cuda_registry.write({"softmax_decode": dict(ENV, status="passed")}, path)
    records = cuda_registry.load(path)
    assert records["softmax_decode"]["status"] == "passed" and records["softmax_fwd_mma"] == {"status": "unverified"}
    assert cuda_registry.describe(records["softmax_decode"]) == "passed on NVIDIA H100 (2026-11-23)"


# --------------------------------------------------------------------------- backend=None and the record

@pytest.fixture
def pretend_gpu(monkeypatch, no_default_backend):
    """CUDA tensors' requests planned for an H100, with the cuda and triton backends available."""
    monkeypatch.setattr(cuda_backend, "_device_info", lambda index: H100)
    monkeypatch.setattr(cuda_backend, "DEFAULT_OK", True)
    monkeypatch.setattr(dispatch, "_AVAILABILITY", {})
    real = dispatch._unavailable
    monkeypatch.setattr(dispatch, "_unavailable", lambda name: None if name in ("cuda", "triton") else real(name))


def _request(sq=2048, sk=2048, needs_grad=False, dtype=torch.bfloat16):
    return dispatch.Request("attention", torch.device("cuda", 0), dtype, needs_grad, frozenset({"causal"}), 128, 128,
                            (2, 8, 2, sq, sk))


def _records(**overrides):
    records = {name: {"status": "unverified"} for name in cuda_registry.KERNELS}
    records.update(overrides)
    return records


def test_unverified_kernels_are_only_run_when_named(pretend_gpu):
    plan = dispatch.choose(_request(), None)
    assert plan.backend == "triton"
    assert "unverified" in dict(plan.passed_over)["cuda"]
    assert dispatch.choose(_request(), "cuda").backend == "cuda"


def test_a_verified_kernel_runs_by_default_only_where_it_was_faster(pretend_gpu, monkeypatch):
    fast = [dict(direction="forward", dtype="bfloat16", head_dim_bucket=128, causal=True, seq_min=1024,
                 seq_max=16384, min_speedup=1.1)]
    monkeypatch.setattr(cuda_backend, "_RECORDS", _records(softmax_fwd_mma=dict(ENV, status="passed",
                                                                                  faster_than_triton=fast)))
    assert dispatch.choose(_request(), None).backend == "cuda"
    slower = dispatch.choose(_request(sq=512, sk=512), None)
    assert slower.backend == "triton" and "not recorded faster" in dict(slower.passed_over)["cuda"]
    # training also needs the backward kernel verified
    assert dispatch.choose(_request(needs_grad=True), None).backend == "triton"
    failed = _records(softmax_fwd_mma=dict(ENV, status="failed", faster_than_triton=fast))
    monkeypatch.setattr(cuda_backend, "_RECORDS", failed)
    assert "FAILED" in dict(dispatch.choose(_request(), None).passed_over)["cuda"]


def test_requests_the_kernels_cannot_run_name_the_reason(pretend_gpu):
    big = dispatch.Request("attention", torch.device("cuda", 0), torch.bfloat16, False, frozenset(), 320, 320,
                           (1, 2, 2, 100, 100))
    assert "softmax" in cuda_backend.cannot_run(big)
    varlen = dispatch.Request("attention_varlen", torch.device("cuda", 0), torch.bfloat16, False, frozenset(), 64, 64)
    assert "no CUDA C++ kernel for attention_varlen" in cuda_backend.cannot_run(varlen)
    dropout = dispatch.Request("attention", torch.device("cuda", 0), torch.bfloat16, False, frozenset({"dropout"}),
                               64, 64, (1, 2, 2, 100, 100))
    assert "dropout" in cuda_backend.cannot_run(dropout)
    linear = dispatch.Request("linear_attention", torch.device("cuda", 0), torch.bfloat16, True, frozenset(), 64, 64,
                              (1, 2, 2, 100))
    assert "causal only" in cuda_backend.cannot_run(linear)
    with pytest.raises(NotImplementedError, match="cuda"):
        dispatch.choose(big, "cuda")


def test_explain_names_the_kernels_and_their_status(pretend_gpu):
    kernel = cuda_backend.kernel(_request(sq=1, needs_grad=True))
    assert kernel == "pyattn._cuda softmax_decode [unverified] + softmax_bwd_mma [unverified]"


def test_record_cuda_speed_pairs_cuda_and_triton_rows(pretend_gpu):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "record_cuda_speed.py"
    spec = importlib.util.spec_from_file_location("record_cuda_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def row(provider, family, seq_q, seq, pas, ms, status="ok"):
        shape = dict(batch=1, heads_q=16, heads_kv=16, seq_q=seq_q, seq_k=seq, head_dim=128, head_dim_v=128)
        return dict(provider=provider, family=family, shape=shape, shape_id=f"{family}-{seq_q}-{seq}", seq=seq,
                    dtype="bfloat16", causal=True, status=status, ms_median=ms, **{"pass": pas})

    results = [row("pyattn-cuda", "softmax", 4096, 4096, "fwd", 1.0),
               row("pyattn-triton", "softmax", 4096, 4096, "fwd", 1.5),
               row("pyattn-cuda", "softmax", 4096, 4096, "bwd", 3.0),
               row("pyattn-triton", "softmax", 4096, 4096, "bwd", 2.0),
               row("pyattn-cuda", "decode", 1, 65536, "fwd", 0.1), row("pyattn-triton", "decode", 1, 65536, "fwd", 0.2),
               row("pyattn-cuda", "linear", 4096, 4096, "fwd", 1.0),
               row("pyattn-triton", "linear", 4096, 4096, "fwd", 1.0, status="failed"),
               row("pyattn-cuda", "softmax", 4096, 4096, "fwd+bwd", 4.0)]
    rows = script.paired_rows(results)
    assert [(r["kernel"], r["direction"], r["seq"], r["cuda_ms"], r["triton_ms"]) for r in rows] == [
        ("softmax_fwd_mma", "forward", 4096, 1.0, 1.5), ("softmax_bwd_mma", "backward", 4096, 3.0, 2.0),
        ("softmax_decode", "forward", 65536, 0.1, 0.2)]
    assert all(r["head_dim_bucket"] == 128 and r["causal"] for r in rows)


# --------------------------------------------------------------------------- the Python launchers' marshalling

class Recorder:
    """pyattn._cuda with the launches replaced by a record of their arguments (the plans are the real ones)."""

    def __init__(self):
        self.calls = {}
        self.plan_softmax, self.plan_linear, self.LinearArgs = cuda.plan_softmax, cuda.plan_linear, cuda.LinearArgs

    def __getattr__(self, name):
        return lambda *args, **kw: self.calls.setdefault(name, (args, kw))


@pytest.fixture
def recorder(monkeypatch):
    from pyattn.launchers import cuda_linear, cuda_softmax

    rec = Recorder()
    kw = dict(dtype=2, device_info=H100, device=0, stream=1234)
    for mod in (cuda_softmax, cuda_linear):
        monkeypatch.setattr(mod, "module", lambda: rec)
        monkeypatch.setattr(mod, "_launch_kw", lambda q: dict(kw, dtype={torch.bfloat16: 2, torch.float16: 1,
                                                                          torch.float32: 0}[q.dtype]))
    return rec


def test_softmax_launchers_pass_pointers_strides_and_a_planned_workspace(recorder):
    from pyattn.launchers import cuda_softmax

    q = torch.randn(2, 40, 8, 80, dtype=torch.bfloat16).transpose(1, 2)  # (B, S, H, D) seen as (B, H, S, D)
    k, v = (torch.randn(2, 2, 50, 80, dtype=torch.bfloat16) for _ in range(2))
    out, lse = torch.empty(2, 8, 40, 80, dtype=torch.bfloat16), torch.empty(2, 8, 40)
    cuda_softmax.softmax_forward(q, k, v, out, lse, scale=0.1, causal=True, window_left=3, window_right=-1,
                                 softcap=0.0)
    args, kw = recorder.calls["softmax_forward"]
    assert args[:5] == (q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr())
    assert args[5:] == (q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), out.stride(), lse.stride())
    assert kw["workspace"] == (0, 0) and kw["stream"] == 1234 and kw["window_left"] == 3  # no split: no workspace

    grads = [torch.empty_like(x) for x in (q, k, v)]
    cuda_softmax.softmax_backward(q, k, v, out, out, lse, None, *grads, scale=0.1, causal=True, window_left=3,
                                  window_right=-1, softcap=0.0)
    args, kw = recorder.calls["softmax_backward"]
    assert args[0] == (q.data_ptr(), q.stride()) and args[6] == (0, (0, 0, 0)) and args[10:] == (q.shape, k.shape,
                                                                                                   v.shape)
    plan = softmax_plan("backward", 2, 8, 2, 40, 50, 80, causal=True)
    assert kw["workspace"][1] == plan["workspace_floats"] > 0 and kw["workspace"][0] != 0


def test_linear_launchers_pass_the_arguments_the_cpu_module_takes(recorder):
    from pyattn.launchers import cuda_linear

    q, k = torch.randn(1, 4, 100, 32), torch.randn(1, 2, 100, 32)
    v = torch.randn(1, 2, 100, 48)
    g = torch.zeros(1, 4, 100)
    out, fs, fz = torch.empty(1, 4, 100, 48), torch.empty(1, 4, 32, 48), torch.empty(1, 4, 32)
    cuda_linear.linear_forward(q, k, v, g, None, None, out, fs, fz, causal=True, feature_map="relu", normalize=True,
                               scale=0.5, eps=1e-6)
    args, kw = recorder.calls["linear_forward"]
    assert args[0] == (q.data_ptr(), q.stride()) and args[3] == (g.data_ptr(), g.stride()) and args[4][0] == 0
    assert kw["args"].__class__.__name__ == "LinearArgs" and kw["device_info"] == H100
    plan = linear_plan("forward", 1, 4, 2, 100, 32, 48, dtype=F32, decay=True)
    assert kw["workspace"][1] == plan["workspace_floats"]


def test_device_info_from_torch_properties(monkeypatch):
    from types import SimpleNamespace

    from pyattn.launchers import cuda_softmax

    props = SimpleNamespace(major=9, minor=0, multi_processor_count=132, shared_memory_per_block_optin=232448)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert cuda_softmax.device_info(torch.device("cuda", 0)) == (9, 0, 132, 232448)
    del props.shared_memory_per_block_optin  # older builds: the architecture's documented limit
    assert cuda_softmax.device_info(torch.device("cuda", 0)) == (9, 0, 132, 227 * 1024)
