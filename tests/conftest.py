"""Test harness: the Triton interpreter without a GPU, the `gpu` marker, NaN-poisoned buffers."""
import os
import sys

# The source tree's kernels/ folder is pyattn.kernels (setup.py maps it; so does the editable install).
# `python -m pytest` puts the repo root on sys.path, where that folder would shadow Hugging Face's
# `kernels` package, which transformers >= 5 imports.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

# The interpreter's tl.dot is a small numpy matmul; multithreaded OpenBLAS on a busy 2-core machine
# spends ~30 ms on each. Set before torch imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

# Must happen before anything imports triton: kernels then run on CPU tensors through Triton's interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
# Imported here, not first by a test under poison_empty: dynamo would keep the NaN-filling torch.empty.
import torch._dynamo  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison_empty(monkeypatch):
    """Fill new float buffers with NaN, so an element a kernel forgot to write fails loudly."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(fn):
        def make(*args, **kwargs):
            x = fn(*args, **kwargs)
            return x.fill_(float("nan")) if x.is_floating_point() else x
        return make

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


@pytest.fixture
def no_default_backend(monkeypatch):
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)


# --------------------------------------------------------------------------- CUDA kernel verification record

def pytest_addoption(parser):
    parser.addoption("--record-cuda-verification", action="store_true",
                     help="after a GPU run, write which pyattn._cuda kernels passed every test and the "
                          "compute-sanitizer check exercising them to pyattn/dispatch/cuda_verified.json")


_CUDA_OUTCOMES = []  # (kernel families, passed, sanitizer check, node id) of this session's tests


@pytest.fixture
def cuda_kernels(request):
    """`cuda_kernels(*families, sanitizer=False)`: record that this test exercises these pyattn._cuda kernels."""
    def record(*families, sanitizer=False):
        request.node.user_properties.append(("cuda_kernels", (tuple(families), sanitizer)))
    return record


def pytest_runtest_logreport(report):
    if report.when != "call" and not report.failed:
        return
    for key, (families, sanitizer) in report.user_properties:
        if key == "cuda_kernels" and not report.skipped:
            _CUDA_OUTCOMES.append((families, report.passed, sanitizer, report.nodeid))


def pytest_sessionfinish(session):
    if not session.config.getoption("--record-cuda-verification") or not _CUDA_OUTCOMES:
        return
    import datetime
    import subprocess

    from pyattn.dispatch import cuda_registry

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    environment = dict(device=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                       torch=torch.__version__, cuda=torch.version.cuda, commit=commit or "?")
    records = cuda_registry.summarize_tests(_CUDA_OUTCOMES, previous=cuda_registry.load(), environment=environment)
    cuda_registry.write(records)
