"""The CUDA kernels' own source, run on the CPU under the emulation of tests/cuda_emulation, against the
float64 reference.

`csrc/bindings_cuda.cpp` and every CUDA `.cu` file are compiled as C++ with g++ and
`-DPYATTN_CUDA_EMULATION` into a module `_cuda_emulated`; the project's real launchers
(`pyattn.launchers.cuda_softmax`, `cuda_linear`) then run with `module()` returning it, on CPU tensors, so
the real plans, launch functions and kernels execute: every CTA, every thread (as cooperative fibers),
with __syncthreads, warp shuffles, ldmatrix, mma.sync and cp.async as the PTX ISA defines them.

What this proves: the kernels' logic and index math (strides, GQA, masks, tails, splits, workspaces), their
synchronisation structure (a barrier or warp collective not every thread reaches deadlocks and fails; each
case runs under three thread orders, one of which lets every warp run ahead to its next barrier, so a
missing barrier shows; cp.async data lands only at its wait_group), shared-memory bounds and the cp.async /
ldmatrix alignment rules, the fragment layouts of mma and ldmatrix as the PTX ISA documents them, the
launch configuration (block size, the opt-in for more than 48 KiB of shared memory) and the results'
accuracy with 16-bit operands and float32 accumulation.
What it cannot: hardware timing and performance, races the memory model allows beyond barrier placement
(only a few deterministic interleavings run), the real PTX instructions and their last-bit rounding, the
code nvcc generates (register pressure, spills, its own bugs), index overflow at sizes too large to run
here, out-of-bounds global accesses that land in mapped memory (unless built with the sanitizer, below).

Tolerance: `pyattn.testing.assert_close_relative` against plain PyTorch in the kernel's dtype, as in
tests/attention_checks.py; gradients include the gradient of lse. Output buffers start as NaN, so an element
a kernel does not write fails; shared memory starts as NaN bytes in every CTA.

Environment: PYATTN_CUDA_EMULATED_MODULE=path reuses a module built before (no build);
PYATTN_CUDA_EMULATION_SANITIZE=1 builds with AddressSanitizer, which checks the kernels' global-memory
accesses against the tensors' allocations (run python with LD_PRELOAD=$(g++ -print-file-name=libasan.so)
ASAN_OPTIONS=detect_leaks=0).
"""
from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from pyattn import reference as ref
from pyattn.testing import assert_close_relative

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMULATION = ROOT / "tests" / "cuda_emulation"
MODULE = "_cuda_emulated"
H100 = (9, 0, 132, 227 * 1024)
TWO_SMS = (9, 0, 2, 227 * 1024)  # few multiprocessors: split-KV decoding splits 512+ keys
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# --------------------------------------------------------------------------- building the module

def _sources():
    kernels = sorted(CSRC.glob("softmax/attention_cuda_*.cu")) + sorted(CSRC.glob("linear/linear_cuda_*.cu"))
    return kernels + [CSRC / "cuda_launch.cu"]


def _compile(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}\n{proc.stderr[-6000:]}")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_emulated_module(out_dir: Path, sanitize: bool = False):
    """Compiles the emulated module into out_dir (g++ directly, one job per CPU) and imports it.
    sanitize: AddressSanitizer (catches out-of-bounds global accesses; python must then run with
    LD_PRELOAD=$(g++ -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0)."""
    import pybind11

    flags = ["-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer"] if sanitize else ["-O2"]
    # -fno-strict-aliasing: CUDA code puns types through pointer casts, which nvcc allows.
    common = ["g++", "-std=c++17", *flags, "-fPIC", "-fno-strict-aliasing", "-DPYATTN_CUDA_EMULATION",
              "-Wno-unknown-pragmas", f"-I{EMULATION}", f"-I{CSRC}"]
    jobs = [common + ["-x", "c++", "-c", str(src), "-o", str(out_dir / f"{src.stem}.o")] for src in _sources()]
    jobs.append(common + ["-c", str(EMULATION / "emu_runtime.cpp"), "-o", str(out_dir / "emu_runtime.o")])
    jobs.append(common + [f"-DPYATTN_CUDA_MODULE_NAME={MODULE}", '-DPYATTN_CUDA_ARCHS_STRING="emulated"',
                          '-DPYATTN_CUDA_COMPILER_VERSION="g++ emulation"', f"-I{pybind11.get_include()}",
                          f"-I{sysconfig.get_paths()['include']}", "-fvisibility=hidden", "-c",
                          str(CSRC / "bindings_cuda.cpp"), "-o", str(out_dir / "bindings_cuda.o")])
    jobs.sort(key=lambda cmd: "bwd" not in cmd[-3] and "fwd" not in cmd[-3])  # the slow ones first
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_compile, jobs))
    target = out_dir / f"{MODULE}{sysconfig.get_config_var('EXT_SUFFIX')}"
    _compile(["g++", "-shared", *flags, "-o", str(target), *map(str, sorted(out_dir.glob("*.o"))), "-lpthread"])
    return load_module(target)


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    prebuilt = os.environ.get("PYATTN_CUDA_EMULATED_MODULE")  # a module built before: skip the build
    if prebuilt:
        return load_module(Path(prebuilt))
    if not sys.platform.startswith("linux"):
        pytest.skip("the CUDA emulation runs on Linux (ucontext fibers, g++)")
    if shutil.which("g++") is None:
        pytest.skip("the CUDA emulation needs g++")
    if importlib.util.find_spec("pybind11") is None:
        pytest.skip("the CUDA emulation needs pybind11")
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        pytest.skip("the CUDA emulation needs the Python headers (Python.h)")
    sanitize = os.environ.get("PYATTN_CUDA_EMULATION_SANITIZE") == "1"
    return build_emulated_module(tmp_path_factory.mktemp("cuda_emulated"), sanitize=sanitize)


# The orders in which a CTA's threads run (emu_runtime.cpp): near lockstep, and each warp in turn
# running ahead to the next barrier (from the first warp, and from the last), so that a missing
# barrier lets one warp overwrite shared data another still reads.
SCHEDULES = ["round", "greedy", "greedy-reverse"]


@pytest.fixture
def any_schedule(emulated, monkeypatch, poison_empty):
    """pyattn.launchers.cuda_softmax / cuda_linear running the emulated module on CPU tensors; the
    device_info the plans see is set per test through `.device_info`, the schedule through
    `.schedule(name)`. The launchers' workspaces start as NaN (poison_empty): a kernel must not read
    what it did not write."""
    from pyattn.launchers import cuda_linear, cuda_softmax

    class State:
        device_info = H100
        softmax, linear, module = cuda_softmax, cuda_linear, emulated

        @staticmethod
        def schedule(name):
            monkeypatch.setenv("PYATTN_EMU_SCHEDULE", name)

    for mod in (cuda_softmax, cuda_linear):
        monkeypatch.setattr(mod, "module", lambda: emulated)
        monkeypatch.setattr(mod, "_launch_kw", lambda q: dict(dtype=CODES[q.dtype], device_info=State.device_info,
                                                              device=0, stream=0))
    return State


@pytest.fixture(params=SCHEDULES)
def launchers(request, any_schedule):
    any_schedule.schedule(request.param)
    return any_schedule


def nan_like(x, dtype=None):
    """A new buffer full of NaN: an element the kernel does not write fails the comparison."""
    return torch.full(x.shape, float("nan"), dtype=dtype or x.dtype)


# --------------------------------------------------------------------------- softmax attention

def make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout, seed=0):
    """layout: "bhsd" contiguous, "bshd" a (B, S, H, D) buffer seen as (B, H, S, D), "offset" a contiguous
    tensor starting one element into its buffer (misaligned rows: the kernels' scalar load paths)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(heads, seq, dim):
        if layout == "bshd":
            return torch.randn(b, seq, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        if layout == "offset":
            flat = torch.randn(b * heads * seq * dim + 1, generator=gen).to(dtype)
            return flat[1:].view(b, heads, seq, dim)
        return torch.randn(b, heads, seq, dim, generator=gen).to(dtype)

    return rand(hq, sq, d), rand(hkv, sk, d), rand(hkv, sk, dv)


def softmax_plan(launchers, direction, q, k, v, masks):
    return launchers.module.plan_softmax(direction, tuple(q.shape), tuple(k.shape), tuple(v.shape),
                                         dtype=CODES[q.dtype], device_info=launchers.device_info, **masks)


def run_softmax_forward(launchers, q, k, v, scale, masks):
    out = nan_like(torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype))
    lse = nan_like(torch.empty(q.shape[:3], dtype=torch.float32))
    launchers.softmax.softmax_forward(q, k, v, out, lse, scale=scale, **masks)
    return out, lse


def reference_softmax(q, k, v, scale, masks, *, grad):
    """(out, lse) of the float64 reference and of plain PyTorch in q's dtype (the error budget)."""
    window = (masks["window_left"], masks["window_right"])
    kw = dict(scale=scale, causal=masks["causal"], window=window, softcap=masks["softcap"])
    doubles = [x.detach().double().requires_grad_(grad) for x in (q, k, v)]
    lows = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
    return doubles, ref.attention(*doubles, return_lse=True, **kw), lows, ref._softmax_attention(*lows, **kw)


def loss(out, lse, g_out, g_lse):
    finite = torch.isfinite(lse)
    return (out.double() * g_out.double()).sum() + (torch.where(finite, lse.double(), 0.0) * g_lse.double()).sum()


# (kernel the plan must pick, dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, softcap, layout, device_info)
SOFTMAX_FWD = {
    "mma-f16-d64-causal": ("softmax_fwd_mma", torch.float16, 1, 2, 2, 70, 70, 64, 64, True, (-1, -1), 0.0,
                           "bhsd", H100),
    "mma-bf16-d80-gqa-window-bshd-sq37-sk70": ("softmax_fwd_mma", torch.bfloat16, 1, 4, 2, 37, 70, 80, 80, False,
                                               (9, 5), 0.0, "bshd", H100),
    "mma-f16-d128-softcap-causal-sq70-sk37": ("softmax_fwd_mma", torch.float16, 2, 2, 1, 70, 37, 128, 128, True,
                                              (-1, -1), 5.0, "bhsd", H100),
    "mma-bf16-d256": ("softmax_fwd_mma", torch.bfloat16, 1, 1, 1, 33, 40, 256, 256, False, (-1, -1), 0.0, "bshd",
                      H100),
    "mma-f16-d64-offset-gqa4": ("softmax_fwd_mma", torch.float16, 1, 4, 1, 30, 50, 64, 64, True, (-1, -1), 0.0,
                                "offset", H100),
    "mma-f16-sk0": ("softmax_fwd_mma", torch.float16, 1, 2, 1, 20, 0, 64, 64, False, (-1, -1), 0.0, "bhsd", H100),
    "simt-f32-causal-gqa": ("softmax_fwd_simt", torch.float32, 1, 4, 2, 37, 70, 64, 64, True, (-1, -1), 0.0,
                            "bhsd", H100),
    "simt-f32-d80-window-softcap-bshd": ("softmax_fwd_simt", torch.float32, 2, 2, 2, 45, 33, 80, 80, False,
                                         (6, 3), 3.0, "bshd", H100),
    "decode-f32-sq1-gqa-split": ("softmax_decode", torch.float32, 2, 4, 1, 1, 700, 64, 64, False, (-1, -1), 0.0,
                                 "bhsd", TWO_SMS),
    "decode-f16-sq5-causal-split": ("softmax_decode", torch.float16, 1, 4, 2, 5, 530, 128, 128, True, (-1, -1),
                                    0.0, "bshd", TWO_SMS),
    "decode-bf16-sq16-window-softcap": ("softmax_decode", torch.bfloat16, 1, 2, 2, 16, 900, 80, 80, True,
                                        (600, -1), 4.0, "bhsd", TWO_SMS),
    "decode-bf16-sq3-d256": ("softmax_decode", torch.bfloat16, 1, 2, 1, 3, 90, 256, 256, False, (-1, -1), 0.0,
                             "bhsd", H100),
    "decode-f16-sq16-gqa8-row-blocks": ("softmax_decode", torch.float16, 1, 8, 1, 16, 70, 64, 64, False, (-1, -1),
                                        0.0, "bhsd", H100),
    "decode-bf16-offset-split": ("softmax_decode", torch.bfloat16, 1, 2, 1, 2, 600, 40, 40, False, (-1, -1), 0.0,
                                 "offset", TWO_SMS),
    "decode-f16-sk0": ("softmax_decode", torch.float16, 1, 2, 2, 4, 0, 64, 64, False, (-1, -1), 0.0, "bhsd",
                       H100),
}


@pytest.mark.parametrize("case", list(SOFTMAX_FWD))
def test_softmax_forward(launchers, case):
    kernel, dtype, b, hq, hkv, sq, sk, d, dv, causal, window, softcap, layout, info = SOFTMAX_FWD[case]
    launchers.device_info = info
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout)
    masks = dict(causal=causal, window_left=window[0], window_right=window[1], softcap=softcap)
    plan = softmax_plan(launchers, "forward", q, k, v, masks)
    assert plan["error"] is None and plan["kernel"] == kernel, plan
    if info is TWO_SMS:
        assert plan["num_splits"] > 1, plan
    check_softmax_forward(launchers, q, k, v, masks)


def check_softmax_forward(launchers, q, k, v, masks):
    scale = q.shape[-1] ** -0.5
    out, lse = run_softmax_forward(launchers, q, k, v, scale, masks)
    _, (ref_out, ref_lse), _, (base_out, base_lse) = reference_softmax(q, k, v, scale, masks, grad=False)
    assert_close_relative(out, ref_out, base_out, name="out")
    assert_close_relative(lse, ref_lse, base_lse, name="lse", floor=2e-5)


# (dtype, B, Hq, Hkv, Sq, Sk, D, Dv, causal, window, softcap, layout, with dlse)
SOFTMAX_BWD = {
    "f16-d64-causal": (torch.float16, 1, 2, 2, 70, 70, 64, 64, True, (-1, -1), 0.0, "bhsd", True),
    "bf16-d80-gqa-window-bshd-sq37-sk70": (torch.bfloat16, 1, 4, 2, 37, 70, 80, 80, False, (9, 5), 0.0, "bshd",
                                           False),
    "f16-d128-softcap-causal-sq70-sk37": (torch.float16, 1, 2, 1, 70, 37, 128, 128, True, (-1, -1), 5.0, "bhsd",
                                          True),
    "bf16-d256-sq70-sk40": (torch.bfloat16, 1, 2, 1, 70, 40, 256, 256, False, (-1, -1), 0.0, "bshd", True),
    "f16-d64-offset-window": (torch.float16, 1, 2, 2, 45, 45, 64, 64, False, (7, 2), 0.0, "offset", True),
    "f16-sk0": (torch.float16, 1, 2, 1, 20, 0, 64, 64, False, (-1, -1), 0.0, "bhsd", True),
    "bf16-sq0": (torch.bfloat16, 1, 2, 1, 0, 30, 64, 64, False, (-1, -1), 0.0, "bhsd", True),  # dk = dv = 0
    "f16-d64-dv48-causal-gqa": (torch.float16, 2, 4, 2, 20, 30, 64, 48, True, (-1, -1), 0.0, "bshd", True),
    "bf16-decode-shape-sq3-gqa": (torch.bfloat16, 1, 4, 1, 3, 50, 64, 64, True, (-1, -1), 0.0, "bhsd", True),
}


@pytest.mark.parametrize("case", list(SOFTMAX_BWD))
def test_softmax_backward(launchers, case):
    dtype, b, hq, hkv, sq, sk, d, dv, causal, window, softcap, layout, with_dlse = SOFTMAX_BWD[case]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dv, dtype, layout, seed=1)
    masks = dict(causal=causal, window_left=window[0], window_right=window[1], softcap=softcap)
    plan = softmax_plan(launchers, "backward", q, k, v, masks)
    assert plan["error"] is None and plan["kernel"] == "softmax_bwd_mma", plan
    check_softmax_backward(launchers, q, k, v, masks, with_dlse)


def check_softmax_backward(launchers, q, k, v, masks, with_dlse):
    dtype, scale = q.dtype, q.shape[-1] ** -0.5
    out, lse = run_softmax_forward(launchers, q, k, v, scale, masks)
    gen = torch.Generator().manual_seed(7)
    g_out = torch.randn(out.shape, generator=gen).to(dtype)
    g_lse = torch.randn(lse.shape, generator=gen) if with_dlse else torch.zeros(lse.shape)
    dq, dk, dv_ = nan_like(q), nan_like(k), nan_like(v)
    launchers.softmax.softmax_backward(q, k, v, out, g_out, lse, g_lse if with_dlse else None, dq, dk, dv_,
                                       scale=scale, **masks)

    doubles, (ref_out, ref_lse), lows, (base_out, base_lse) = reference_softmax(q, k, v, scale, masks, grad=True)
    ref_grads = torch.autograd.grad(loss(ref_out, ref_lse, g_out, g_lse), doubles, allow_unused=True)
    base_grads = torch.autograd.grad(loss(base_out, base_lse, g_out, g_lse), lows, allow_unused=True)
    for name, g, r, bl, x in zip(("dq", "dk", "dv"), (dq, dk, dv_), ref_grads, base_grads, (q, k, v)):
        r = torch.zeros_like(x, dtype=torch.float64) if r is None else r  # Sk = 0: no path to the output
        bl = torch.zeros_like(x) if bl is None else bl
        assert_close_relative(g, r, bl, name=name)


# --------------------------------------------------------------------------- linear attention

def make_linear(b, hq, hkv, s, d, dv, dtype, *, decay, state, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def qkv(heads, dim):
        if layout == "bshd":
            return torch.randn(b, s, heads, dim, generator=gen).to(dtype).transpose(1, 2)
        return torch.randn(b, heads, s, dim, generator=gen).to(dtype)

    q, k, v = qkv(hq, d), qkv(hkv, d), qkv(hkv, dv)
    log_decay = -torch.rand(b, s, hq, generator=gen).transpose(1, 2) * 0.5 if decay else None
    s0 = z0 = None
    if state:
        s0 = torch.randn(b, hq, d, dv, generator=gen)
        z0 = (torch.rand(b, hq, d, generator=gen) + 0.5) * max(s, 1)
    return q, k, v, log_decay, s0, z0


LINEAR_KW = dict(causal=True, feature_map="elu", normalize=True, scale=0.5, eps=1e-6)


def reference_linear(inputs, dtype64, kw, *, grad):
    q, k, v, log_decay, s0, z0 = [None if x is None else x.detach().to(dtype64 or x.dtype).requires_grad_(grad)
                                  for x in inputs]
    out, (s, z) = ref.linear_attention(q, k, v, log_decay=log_decay,
                                       initial_state=None if s0 is None else (s0, z0), output_final_state=True,
                                       **kw)
    leaves = [x for x in (q, k, v, log_decay, s0, z0) if x is not None]
    return leaves, (out, s, z)


# (kernel the forward plan must pick, dtype, B, Hq, Hkv, S, D, Dv, decay, initial state, layout, device_info)
# On H100 the chunked forward of few heads runs in two passes (state sweep, then chunks in parallel);
# TWO_SMS makes 8 CTAs several waves: one pass.
LINEAR = {
    "recurrent-f32-s1-decay-state-gqa": ("linear_recurrent_fwd", torch.float32, 1, 4, 2, 1, 32, 48, True, True,
                                         "bhsd", H100),
    "recurrent-bf16-s16-state-bshd": ("linear_recurrent_fwd", torch.bfloat16, 2, 2, 2, 16, 64, 64, False, True,
                                      "bshd", H100),
    "chunk-f32-s70-decay-gqa-bshd": ("linear_chunk_fwd", torch.float32, 1, 4, 2, 70, 40, 32, True, False, "bshd",
                                     H100),
    "chunk-bf16-s70-decay-state-d128": ("linear_chunk_fwd", torch.bfloat16, 1, 2, 1, 70, 100, 72, True, True,
                                        "bhsd", H100),
    "chunk-f32-s40-one-pass-state-gqa": ("linear_chunk_fwd", torch.float32, 2, 4, 1, 40, 16, 20, False, True,
                                         "bshd", TWO_SMS),
    "recurrent-bf16-s0-state": ("linear_recurrent_fwd", torch.bfloat16, 1, 2, 1, 0, 16, 16, True, True, "bhsd",
                                H100),  # the final state is the initial one
    "chunk-f16-s90-decay": ("linear_chunk_fwd", torch.float16, 1, 1, 1, 90, 64, 64, True, False, "bhsd", H100),
}


@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_forward(launchers, case):
    kernel, dtype, b, hq, hkv, s, d, dv, decay, state, layout, info = LINEAR[case]
    launchers.device_info = info
    inputs = make_linear(b, hq, hkv, s, d, dv, dtype, decay=decay, state=state, layout=layout)
    q, k, v, log_decay, s0, z0 = inputs
    args = launchers.linear.linear_args(launchers.module, q, k, v, **LINEAR_KW)
    plan = launchers.linear.plan("forward", args, has_decay=decay, has_initial_state=state, has_final_state=True,
                                 device_info=info)
    assert plan["error"] is None and plan["kernel"] == kernel, plan
    if kernel == "linear_chunk_fwd":
        assert (plan["workspace_floats"] == 0) == (info is TWO_SMS), plan  # one pass / two passes
    check_linear_forward(launchers, inputs, LINEAR_KW)


def check_linear_forward(launchers, inputs, kw):
    q, k, v, log_decay, s0, z0 = inputs
    (b, hq, s, d), dv = q.shape, v.shape[-1]
    out = nan_like(torch.empty(b, hq, s, dv, dtype=q.dtype))
    final_s, final_z = nan_like(torch.empty(b, hq, d, dv)), nan_like(torch.empty(b, hq, d))
    launchers.linear.linear_forward(q, k, v, log_decay, s0, z0, out, final_s, final_z, **kw)
    _, refs = reference_linear(inputs, torch.float64, kw, grad=False)
    _, bases = reference_linear(inputs, None, kw, grad=False)
    for name, a, r, bl in zip(("out", "final S", "final z"), (out, final_s, final_z), refs, bases):
        assert_close_relative(a, r, bl, name=name)


@pytest.mark.parametrize("case", list(LINEAR))
def test_linear_backward(launchers, case):
    _, dtype, b, hq, hkv, s, d, dv, decay, state, layout, info = LINEAR[case]
    launchers.device_info = info
    inputs = make_linear(b, hq, hkv, s, d, dv, dtype, decay=decay, state=state, layout=layout, seed=3)
    check_linear_backward(launchers, inputs, LINEAR_KW)


def check_linear_backward(launchers, inputs, kw):
    q, k, v, log_decay, s0, z0 = inputs
    (b, hq, s, d), dv, dtype = q.shape, v.shape[-1], q.dtype
    decay, state = log_decay is not None, s0 is not None
    gen = torch.Generator().manual_seed(11)
    d_out = torch.randn(b, hq, s, dv, generator=gen).to(dtype)
    d_s, d_z = torch.randn(b, hq, d, dv, generator=gen), torch.randn(b, hq, d, generator=gen)
    dq, dk, dv_ = nan_like(q), nan_like(k), nan_like(v)
    dlog = nan_like(log_decay, torch.float32) if decay else None
    ds0, dz0 = (nan_like(s0), nan_like(z0)) if state else (None, None)
    launchers.linear.linear_backward(q, k, v, log_decay, s0, z0, d_out, d_s, d_z, dq, dk, dv_, dlog, ds0, dz0, **kw)
    ours = [x for x in (dq, dk, dv_, dlog, ds0, dz0) if x is not None]

    def grads(dtype64):
        leaves, (out, fs, fz) = reference_linear(inputs, dtype64, kw, grad=True)
        total = (out.double() * d_out.double()).sum() + (fs.double() * d_s.double()).sum() + \
            (fz.double() * d_z.double()).sum()
        return torch.autograd.grad(total, leaves)

    names = [n for n, x in zip(("dq", "dk", "dv", "dlog_decay", "dS0", "dz0"), (q, k, v, log_decay, s0, z0))
             if x is not None]
    for name, a, r, bl in zip(names, ours, grads(torch.float64), grads(None)):
        assert_close_relative(a, r, bl, name=name)


# --------------------------------------------------------------------------- random configurations

# Seeded random shapes and options beyond the hand-picked cases; PYATTN_CUDA_EMULATION_RANDOM=N runs N
# of each family (default a few, for CI time).
RANDOM_CASES = int(os.environ.get("PYATTN_CUDA_EMULATION_RANDOM", "4"))
HEAD_DIMS = [8, 16, 24, 40, 64, 72, 80, 96, 112, 128, 136, 160, 200, 256]


def random_softmax_config(seed):
    g = torch.Generator().manual_seed(1000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (), generator=g))]  # noqa: E731
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    dtype = pick([torch.float16, torch.bfloat16, torch.bfloat16, torch.float32])
    sq = pick([rint(1, 16), rint(17, 140)])
    d = pick(HEAD_DIMS)
    dv = d if rint(0, 2) else pick([x for x in HEAD_DIMS if (x <= 128) == (d <= 128)])
    hkv = rint(1, 2)
    cfg = dict(dtype=dtype, b=rint(1, 2), hq=hkv * rint(1, 4), hkv=hkv, sq=sq, sk=pick([0, rint(1, 40), rint(41, 600)]),
               d=d, dv=dv, layout=pick(["bhsd", "bshd", "offset"]), info=pick([H100, TWO_SMS]))
    masks = dict(causal=bool(rint(0, 1)), window_left=pick([-1, -1, rint(0, 80)]),
                 window_right=pick([-1, -1, rint(0, 20)]), softcap=pick([0.0, 0.0, float(rint(1, 20))]))
    return cfg, masks, schedule_of(seed)


def schedule_of(seed):
    return SCHEDULES[seed % len(SCHEDULES)]


@pytest.mark.parametrize("seed", range(RANDOM_CASES * 3))
def test_random_softmax(any_schedule, seed):
    cfg, masks, schedule = random_softmax_config(seed)
    any_schedule.schedule(schedule)
    any_schedule.device_info = cfg.pop("info")
    q, k, v = make_qkv(cfg["b"], cfg["hq"], cfg["hkv"], cfg["sq"], cfg["sk"], cfg["d"], cfg["dv"], cfg["dtype"],
                       cfg["layout"], seed=seed)
    plan = softmax_plan(any_schedule, "forward", q, k, v, masks)
    assert plan["error"] is None, (plan, cfg, masks)
    check_softmax_forward(any_schedule, q, k, v, masks)
    if q.dtype != torch.float32:
        plan = softmax_plan(any_schedule, "backward", q, k, v, masks)
        assert plan["error"] is None, (plan, cfg, masks)
        check_softmax_backward(any_schedule, q, k, v, masks, with_dlse=bool(seed % 2))


@pytest.mark.parametrize("seed", range(RANDOM_CASES * 2))
def test_random_linear(any_schedule, seed):
    g = torch.Generator().manual_seed(2000 + seed)
    pick = lambda xs: xs[int(torch.randint(len(xs), (), generator=g))]  # noqa: E731
    rint = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    any_schedule.schedule(schedule_of(seed))
    any_schedule.device_info = pick([H100, TWO_SMS])
    hkv = rint(1, 2)
    feature_map = pick(["elu", "relu", "identity"])
    kw = dict(causal=True, feature_map=feature_map, normalize=feature_map != "identity" and bool(rint(0, 3)),
              scale=pick([1.0, 0.5, 0.125]), eps=1e-6)
    inputs = make_linear(rint(1, 2), hkv * rint(1, 3), hkv, pick([1, rint(2, 16), rint(17, 150)]), rint(1, 128),
                         rint(1, 128), pick([torch.float32, torch.float16, torch.bfloat16]), decay=bool(rint(0, 1)),
                         state=bool(rint(0, 1)), layout=pick(["bhsd", "bshd"]), seed=seed)
    check_linear_forward(any_schedule, inputs, kw)
    check_linear_backward(any_schedule, inputs, kw)
