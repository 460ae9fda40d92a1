"""pyattn-bench end to end at tiny shapes: tables, --json, --plot, --list, bad options."""
import json
import runpy
import sys

import pytest
import torch

from pyattn.bench.cli import main
from pyattn.bench.results import load

FAST = ["--warmup", "0", "--reps", "2", "--min-reps", "1", "--time-budget", "0.01", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("family, extra", [
    ("softmax", ["--seqlens", "32,64", "--heads", "2/1", "--dim", "16", "--pass", "fwd,bwd",
                 "--causal", "both", "--exclude", "flex,pyattn-triton"]),
    ("linear", ["--seqlens", "32,80", "--heads", "2/1", "--dim", "16", "--pass", "fwd,fwd+bwd",
                "--exclude", "pyattn-triton"]),
    ("decode", ["--seqlens", "64", "--seqlen-q", "2", "--dim", "16", "--heads", "4/2",
                "--exclude", "flex,pyattn-triton"]),
    ("cross", ["--seqlens", "64", "--seqlen-q", "4", "--dim", "16", "--heads", "2",
               "--exclude", "flex,pyattn-triton"]),
])
def test_runs_to_the_end_with_json_and_plot(family, extra, tmp_path, capsys):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    argv = [family, "--providers", "all", "--json", str(out_json)] + FAST + extra
    if _has_matplotlib():
        argv += ["--plot", str(out_png)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "providers:" in printed and "pyattn-reference" in printed and "TFLOP/s" in printed
    assert ("GB/s" in printed) == (family in ("decode", "cross"))
    record = load(str(out_json))   # validates the schema
    assert record["family"] == family and record["machine"]["threads"] == 1
    statuses = {r["status"] for r in record["results"]}
    assert statuses <= {"ok", "skipped"}, [r for r in record["results"] if r["status"] == "failed"]
    ok = [r for r in record["results"] if r["status"] == "ok"]
    assert {r["seq"] for r in ok} == {int(s) for s in extra[1].split(",")}
    assert all(r["ratio"] is not None for r in ok)
    if family in ("decode", "cross"):
        assert all(r["gbps"] > 0 for r in ok)
    if _has_matplotlib():
        assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000


@pytest.mark.parametrize("family", ["softmax", "linear"])
def test_triton_provider_is_checked_and_timed_where_it_runs(family, tmp_path):
    """Under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU) Triton runs on CPU
    tensors: one small case, forward and backward, is enough (the interpreter takes ~1 s a call)."""
    from pyattn import backends
    out_json = tmp_path / "r.json"
    assert main([family, "--providers", "pyattn-triton,pyattn-reference", "--seqlens", "32", "--dim", "16",
                 "--heads", "2/1", "--pass", "fwd+bwd", "--json", str(out_json)] + FAST) == 0
    rows = {r["provider"]: r for r in load(str(out_json))["results"]}
    if backends()["triton"].available:
        assert rows["pyattn-triton"]["status"] in ("ok", "skipped"), rows["pyattn-triton"]
    else:
        assert rows["pyattn-triton"]["status"] == "skipped" and rows["pyattn-triton"]["reason"]
    assert rows["pyattn-reference"]["status"] == "ok"


def test_baseline_and_provider_choice(tmp_path, capsys):
    out_json = tmp_path / "r.json"
    assert main(["softmax", "--providers", "pyattn-reference,sdpa-math", "--baseline", "pyattn-reference",
                 "--seqlens", "32", "--dim", "8", "--heads", "1", "--no-times", "--json", str(out_json)] + FAST) == 0
    record = json.loads(out_json.read_text())
    assert {r["provider"] for r in record["results"]} == {"pyattn-reference", "sdpa-math"}
    assert all(r["baseline"] == "pyattn-reference" and "times_ms" not in r for r in record["results"])
    assert "ratio: pyattn-reference ms / provider ms" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["softmax", "--providers", "nope"], "unknown provider"),
    (["softmax", "--pass", "backward"], "--pass"),
    (["softmax", "--dtype", "float64"], "--dtype"),
    (["cross", "--causal"], "causal"),
    (["softmax", "--heads", "3/2"], "--heads"),
    (["softmax", "--baseline", "torch-loop"], "--baseline"),
    (["linear", "--seqlen-q", "4"], "--seqlen-q"),
])
def test_bad_options_are_refused_before_running(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_module_entry_point_lists_providers(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["pyattn-bench", "linear", "--list"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("pyattn.bench", run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "torch-chunked" in out and "fla-chunk" in out and "skipped:" in out
