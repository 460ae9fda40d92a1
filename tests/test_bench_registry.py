"""pyattn.bench.registry and runner: every provider listed, missing ones skipped with a reason,
a wrong provider caught by the correctness check, nothing ever stops a run."""
import importlib.util

import pytest
import torch

from pyattn import dispatch
from pyattn.bench import registry
from pyattn.bench.case import Case, Shape
from pyattn.bench.registry import Provider, Unsupported
from pyattn.bench.runner import Settings, add_ratios, probe_all, run
from pyattn.bench.timing import Timing, measure

CPU = torch.device("cpu")
FAST = Settings(warmup=1, reps=2, min_reps=1, budget_s=0.01)
TINY = Shape(1, 2, 1, 32, 32, 16, 16)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one thread is faster, and steadier on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_pyattn_backend_and_library_is_listed():
    for family in ("softmax", "decode", "cross", "linear"):
        names = [p.name for p in registry.providers(family)]
        assert names[:len(dispatch.PRIORITY)] == [f"pyattn-{b}" for b in dispatch.PRIORITY]
        assert len(names) == len(set(names))
    softmax = {p.name for p in registry.providers("softmax")}
    assert {"sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn", "flex", "flash-attn", "xformers"} <= softmax
    assert {"torch-loop", "torch-chunked", "fla-chunk"} <= {p.name for p in registry.providers("linear")}


def test_select_and_unknown_names():
    assert [p.name for p in registry.select("softmax", ["sdpa-math", "pyattn-cpu"])] == ["pyattn-cpu", "sdpa-math"]
    assert "flex" not in {p.name for p in registry.select("softmax", ["all"], exclude=["flex"])}
    with pytest.raises(ValueError, match="unknown provider"):
        registry.select("softmax", ["sdpa-nope"])
    with pytest.raises(ValueError, match="family"):
        registry.providers("quadratic")


@pytest.mark.parametrize("family", ["softmax", "decode", "cross", "linear"])
def test_probes_never_raise_and_give_reasons(family):
    for status in probe_all(registry.providers(family), CPU):
        assert status["status"] in ("available", "skipped")
        assert (status["status"] == "skipped") == bool(status["reason"])


def test_missing_libraries_are_skipped_with_the_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.split(".")[0] in ("flash_attn", "xformers", "fla")
                        else real(name, *a))
    rows = {}
    for family in ("softmax", "linear"):
        for s in probe_all(registry.providers(family), CPU):
            rows[s["name"]] = s
    assert "not installed" in rows["flash-attn"]["reason"]
    assert "not installed" in rows["xformers"]["reason"]
    assert "not installed" in rows["fla-chunk"]["reason"]


def _fake(name, fn, probe=lambda device: None, cannot_run=()):
    return Provider(name, "softmax", "test", "a test provider", probe, lambda case, inputs: fn, cannot_run)


def _by_provider(rows):
    out = {}
    for r in rows:
        out.setdefault(r["provider"], []).append(r)
    return out


def test_correctness_check_catches_a_wrong_provider():
    good = registry.select("softmax", ["sdpa-math"])
    zeros = _fake("zeros", lambda q, k, v: torch.zeros_like(q))
    non_causal = _fake("ignores-causal", lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)))
    shapes = [TINY, TINY.with_seq(64, 64)]
    _, rows = run("softmax", good + [zeros, non_causal], shapes, [torch.float32], [True], ["fwd", "fwd+bwd"], CPU,
                  FAST)
    rows = _by_provider(rows)
    assert all(r["status"] == "ok" for r in rows["sdpa-math"])
    for name in ("zeros", "ignores-causal"):
        assert len(rows[name]) == 4
        for r in rows[name]:  # failed on the first shape, and so not timed on the second either
            assert r["status"] == "failed" and "correctness" in r["reason"], r
            assert r["ms_median"] is None and r["tflops"] is None


def test_wrong_gradient_is_caught():
    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        @staticmethod
        def backward(ctx, dout):
            return None, None, None

    def call(q, k, v):
        q2, k2, v2 = (x * 1.0 for x in (q, k, v))   # a graph the zero gradients flow back through
        out = WrongGrad.apply(q2, k2, v2)
        return out + 0 * (q2.sum() + k2.sum() + v2.sum())

    _, rows = run("softmax", [_fake("no-grad", call)], [TINY], [torch.float32], [False], ["fwd", "bwd"], CPU, FAST)
    fwd, bwd = rows
    assert fwd["status"] == "ok"
    assert bwd["status"] == "failed" and "dq" in bwd["reason"]


def test_unsupported_errors_and_broken_probes_never_stop_a_run():
    def unsupported(case, inputs):
        raise Unsupported("needs a tensor core")

    def raises(q, k, v):
        raise RuntimeError("kernel exploded")

    def probe_raises(device):
        raise ImportError("half-installed library")

    providers = [
        Provider("unsupported", "softmax", "test", "", lambda d: None, unsupported),
        _fake("cannot-run", raises, cannot_run=(RuntimeError,)),
        _fake("broken", raises),
        _fake("missing", raises, probe=lambda d: "not installed here"),
        _fake("bad-probe", raises, probe=probe_raises),
    ]
    statuses, rows = run("softmax", providers, [TINY, TINY.with_seq(48, 48)], [torch.float32], [False], ["fwd"],
                         CPU, FAST)
    rows = _by_provider(rows)
    assert rows["unsupported"][0]["status"] == "skipped" and rows["unsupported"][0]["reason"] == "needs a tensor core"
    assert rows["cannot-run"][0]["status"] == "skipped" and "kernel exploded" in rows["cannot-run"][0]["reason"]
    assert rows["broken"][0]["status"] == "failed" and "kernel exploded" in rows["broken"][0]["reason"]
    assert rows["missing"][1]["status"] == "skipped" and rows["missing"][1]["reason"] == "not installed here"
    assert rows["bad-probe"][0]["status"] == "skipped" and "half-installed" in rows["bad-probe"][0]["reason"]
    assert {s["name"]: s["status"] for s in statuses}["missing"] == "skipped"


@pytest.mark.parametrize("family", ["softmax", "linear", "decode", "cross"])
def test_every_runnable_provider_passes_the_check_here(family):
    """On this machine every provider that can run is right, for each family, forward and backward."""
    shape = Shape(1, 2, 1, 4 if family in ("decode", "cross") else 40, 40, 16, 16)
    causal = [family in ("linear", "decode")]
    # flex compiles for ~10 s, Triton under the interpreter takes ~1 s a call (tests/test_bench_cli.py runs it)
    chosen = registry.select(family, ["all"], exclude=["flex", "pyattn-triton"])
    _, rows = run(family, chosen, [shape], [torch.float32], causal, ["fwd+bwd"], CPU, FAST)
    for r in rows:
        assert r["status"] in ("ok", "skipped"), r
        assert (r["status"] == "ok") == (r["ms_median"] is not None)
    ok = {r["provider"] for r in rows if r["status"] == "ok"}
    assert {"pyattn-cpu", "pyattn-reference"} & ok
    if family == "linear":
        assert {"torch-loop", "torch-chunked"} <= ok
    else:
        assert "sdpa-math" in ok


def test_ratios_against_the_baseline():
    rows = [dict(shape_id="s", dtype="float32", causal=False, provider=name, status=status, ms_median=ms,
                 baseline=None, ratio=None, **{"pass": "fwd"})
            for name, status, ms in (("a", "ok", 2.0), ("sdpa-math", "ok", 4.0), ("c", "skipped", None))]
    add_ratios(rows, "softmax")
    assert [r["ratio"] for r in rows] == [2.0, 1.0, None]
    assert {r["baseline"] for r in rows} == {"sdpa-math"}
    add_ratios(rows, "softmax", baseline="a")
    assert [r["ratio"] for r in rows] == [1.0, 0.5, None]


def test_timing_statistics_and_repetition_limits():
    t = Timing([4.0, 1.0, 3.0, 2.0, 100.0])
    assert t.median == 3.0
    assert t.quantile(0.25) == 2.0 and t.quantile(0.75) == 4.0 and t.spread == 2.0
    calls = []
    timing = measure(lambda: calls.append(1), CPU, warmup=2, reps=5, min_reps=1, budget_s=10.0)
    assert len(timing.times_ms) == 5 and len(calls) == 7
    calls.clear()
    timing = measure(lambda: calls.append(1), CPU, warmup=0, reps=50, min_reps=3, budget_s=0.0)
    assert len(timing.times_ms) == 3   # the budget is spent: only the minimum


def test_case_ids():
    assert Shape(1, 8, 2, 1024, 1024, 64, 64).id == "B1-H8/2-S1024-D64"
    assert Shape(2, 8, 8, 1, 4096, 128, 64).id == "B2-H8-Sq1-Sk4096-D128/64"
    case = Case("softmax", TINY, torch.bfloat16, True, "bwd", CPU)
    assert case.dtype_name == "bfloat16" and case.needs_grad
