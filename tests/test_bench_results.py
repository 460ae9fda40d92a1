"""pyattn.bench.results: the JSON schema of pyattn-bench --json, written and checked."""
import copy
import json

import pytest
import torch

from pyattn.bench import registry
from pyattn.bench.case import Shape
from pyattn.bench.results import SCHEMA, SCHEMA_VERSION, load, make_record, validate, write
from pyattn.bench.runner import Settings, add_ratios, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def record():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chosen = registry.select("softmax", ["pyattn-reference", "sdpa-math", "flash-attn"])
        statuses, rows = run("softmax", chosen, [Shape(1, 2, 2, 16, 16, 8, 8)], [torch.float32], [False],
                             ["fwd"], CPU, Settings(warmup=0, reps=2, min_reps=1, budget_s=0.01))
        add_ratios(rows, "softmax")
        return make_record(command="pyattn-bench softmax", args={"family": "softmax"}, family="softmax",
                           device=CPU, providers=statuses, results=rows)
    finally:
        torch.set_num_threads(threads)


def test_record_has_the_documented_fields(record, tmp_path):
    path = tmp_path / "r.json"
    write(record, str(path))
    data = json.loads(path.read_text())
    assert data["schema"] == SCHEMA and data["schema_version"] == SCHEMA_VERSION == 1
    assert data["date"].endswith("+00:00")
    m = data["machine"]
    assert m["device"] == "cpu" and m["cpu_model"] and m["threads"] == 1 and m["cpu_count"] >= 1
    assert data["versions"]["torch"] == torch.__version__ and data["versions"]["pyattn"]
    assert "triton" in data["versions"]
    by_name = {r["provider"]: r for r in data["results"]}
    ok = by_name["sdpa-math"]
    assert ok["status"] == "ok" and ok["reason"] is None
    for key in ("ms_median", "ms_spread", "tflops", "peak_mem_mib", "ratio"):
        assert isinstance(ok[key], float), key
    assert ok["ratio"] == 1.0 and ok["baseline"] == "sdpa-math"
    assert ok["shape"] == dict(batch=1, heads_q=2, heads_kv=2, seq_q=16, seq_k=16, head_dim=8, head_dim_v=8)
    assert (ok["dtype"], ok["causal"], ok["pass"], ok["flops"]) == ("float32", False, "fwd", 4 * 2 * 16 * 16 * 8)
    assert ok["gbps"] is None  # softmax is not memory-bound
    skipped = by_name["flash-attn"]
    assert skipped["status"] == "skipped" and "flash-attn" in skipped["reason"] and skipped["ms_median"] is None
    assert load(str(path)) == data


@pytest.mark.parametrize("breakage", [
    lambda r: r.pop("machine"),
    lambda r: r.update(schema_version=2),
    lambda r: r["machine"].pop("threads"),
    lambda r: r["versions"].pop("torch"),
    lambda r: r["results"][0].pop("ms_median"),
    lambda r: r["results"][0].update(status="maybe"),
    lambda r: r["results"][0].update(causal="yes"),
    lambda r: r["results"][0]["shape"].pop("head_dim"),
    lambda r: next(x for x in r["results"] if x["status"] == "ok").update(ms_median=None),
    lambda r: next(x for x in r["results"] if x["status"] == "skipped").update(reason=None),
    lambda r: r["providers"][0].update(status="skipped", reason=None),
    lambda r: r.update(date="yesterday"),
], ids=["machine", "version", "threads", "torch", "ms", "status", "causal", "shape", "ok-no-time",
        "skip-no-reason", "provider", "date"])
def test_validate_names_what_is_wrong(record, breakage):
    broken = copy.deepcopy(record)
    breakage(broken)
    with pytest.raises(ValueError):
        validate(broken)


def _render_module():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "render_readme.py"
    spec = importlib.util.spec_from_file_location("render_readme", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_section_is_generated_from_the_results(record, tmp_path):
    render = _render_module()
    measured = render.render_measured
    results = tmp_path / "results"
    results.mkdir()
    write(record, str(results / "pyattn-bench_softmax_cpu.json"))
    (results / "other.json").write_text('{"an": "older result file"}')   # neither kind: ignored
    paired = {"date": "2026-11-23", "machine": "CPU", "isa": "avx2", "threads": 2, "torch": "2.13.0",
              "shape": {"batch": 1, "heads": 8, "seq": 2048, "dim": 64}, "rounds": 5,
              "results": [{"case": "fwd-fp32", "causal": c, "pyattn_ms": 10.0, "sdpa_ms": 12.5,
                           "speedup_median_of_ratios": 1.25} for c in (False, True)]}
    (results / "paired.json").write_text(json.dumps(paired))
    ceiling = {"date": "2026-11-23", "machine": "CPU", "isa": "avx2", "torch": "2.13.0", "command": "c",
               "gemm": "torch.mm", "shape": {"batch": 1, "heads": 8, "seq": 2048, "dim": 64}, "results": [
                   {"threads": 2, "sgemm_gflops": 130.0, "sdpa_gflops": 104.0, "pyattn_gflops": 104.0,
                    "sdpa_over_sgemm": 0.8, "pyattn_over_sgemm": 0.8, "speedup_vs_sdpa": 1.0,
                    "goal_over_sgemm": 0.96}]}
    (results / "ceiling.json").write_text(json.dumps(ceiling))
    overhead = {"date": "2026-11-23", "machine": "CPU", "isa": "avx2", "threads": 2, "torch": "2.13.0",
                "command": "c", "rounds": 3, "results": [
                    {"case": "decode", "shape": {"batch": 1, "heads_q": 8, "heads_kv": 2, "seq_q": 1, "seq_k": 64,
                                                 "dim": 16},
                     "calls_us": {"torch SDPA": 20.0, "pyattn.attention": 80.0},
                     "sdpa_over": {"torch SDPA": 1.0, "pyattn.attention": 0.25}}]}
    (results / "overhead.json").write_text(json.dumps(overhead))
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nkept\n\n{render.START}\nstale\n{render.END}\n\nmiddle\n\n"
                      f"{measured.START}\nstale too\n{measured.END}\n\nkept too\n")
    with pytest.raises(SystemExit):
        render.main(["--readme", str(readme), "--results", str(results), "--check"])
    render.main(["--readme", str(readme), "--results", str(results)])
    text = readme.read_text()
    assert text.startswith("# title\n\nkept\n\n") and text.endswith(f"{measured.END}\n\nkept too\n")
    assert "stale" not in text and "| provider | S=16 |" in text and "| sdpa-math | " in text
    assert "flash-attn (flash-attn is not installed" in text
    assert "| fwd-fp32 | 10.0 vs 12.5 ms: **1.25x** | 10.0 vs 12.5 ms: **1.25x** |" in text
    assert ("| 2 | 130 GFLOP/s | 104 GFLOP/s (0.80 of sgemm) | 104 GFLOP/s (0.80 of sgemm) | 1.00x "
            "| 0.96 of sgemm |") in text
    assert "| case (B, Hq/Hkv, Sq, Sk, D) | torch SDPA | pyattn.attention |" in text
    assert "| decode (1, 8/2, 1, 64, 16) | 20 us (1.00x) | 80 us (0.25x) |" in text
    render.main(["--readme", str(readme), "--results", str(results), "--check"])   # up to date now


def test_committed_readme_matches_the_committed_results():
    _render_module().main(["--check"])
