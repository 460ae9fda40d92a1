"""Linear-recurrent attention on CPU: pyattn's C++ kernels against plain-torch formulations and
pyattn's own CPU softmax attention, in one process.

    python -m pytest bench/bench_linear.py --benchmark-only       # pytest-benchmark tables
    python bench/bench_linear.py [--rounds 9] [--json bench/results/FILE.json]
                                                                    # medians of paired ratios

Shapes from issue #4's CPU goal: B=1, H=8, D=64, float32, causal, elu + 1 features, normalized,
torch's thread count. Providers:

* ``pyattn-linear``: ``pyattn.linear_attention(..., backend="cpu")`` (the C++ kernels);
* ``torch-chunked``: `pyattn.bench.baselines.chunked_linear_attention` (also pyattn-bench's),
  chunks of 64 tokens in batched matmuls, the states entering each chunk from a cumulative sum
  over the chunks (autograd gives its backward);
* ``torch-token-loop``: `torch_token_loop` below, the recurrence one token at a time in torch
  (a lean loop: one outer-product update and one (1 x D) @ (D x Dv) product per token; the
  reference's own loop, ``pyattn.reference.linear_attention_recurrent``, is ~50x slower);
* ``pyattn-softmax``: ``pyattn.attention(q, k, v, causal=True, backend="cpu")``, the C++ softmax
  kernel (what linear attention replaces).

Decoding: one token with a state after a context of 1k .. 64k tokens (the state's size does not
depend on the context; softmax decoding over a KV cache of that length is timed beside it).
On a shared, noisy machine a ratio of two calls timed back to back is steadier than two
medians taken minutes apart: the script mode alternates the providers and reports the median
of the per-round ratios.
"""
import argparse
import datetime
import json
import resource
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import pyattn
from pyattn.bench.baselines import chunked_linear_attention as torch_chunked
from pyattn.bench.results import cpu_model

B, H, S, D = 1, 8, 8192, 64
DECODE_CONTEXTS = [1024, 4096, 16384, 65536]


def torch_token_loop(q, k, v, eps=1e-6):
    """The same attention as the recurrence, token after token, in plain torch."""
    b, h, s, d = q.shape
    qf, kf = F.elu(q) + 1, F.elu(k) + 1
    state = q.new_zeros(b, h, d, v.shape[-1])
    norm = q.new_zeros(b, h, d)
    outs = []
    for t in range(s):
        k_t, q_t = kf[:, :, t], qf[:, :, t].unsqueeze(-2)            # (b, h, D), (b, h, 1, D)
        state = state + k_t.unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        norm = norm + k_t
        num = (q_t @ state).squeeze(-2)                               # (b, h, Dv)
        den = (q_t @ norm.unsqueeze(-1)).squeeze(-1)                  # (b, h, 1)
        outs.append(num / (den + eps))
    return torch.stack(outs, 2)


PROVIDERS = {
    "pyattn-linear": lambda q, k, v: pyattn.linear_attention(q, k, v, backend="cpu"),
    "torch-chunked": torch_chunked,
    "torch-token-loop": torch_token_loop,
    "pyattn-softmax": lambda q, k, v: pyattn.attention(q, k, v, causal=True, backend="cpu"),
}
# Rounds per provider: softmax attention takes seconds at S=8192. The token loop takes ~2 s
# forward and ~20 s forward+backward at S=1024 on the 2-core dev machine (~10 min at 8192), so
# it runs at TOKEN_LOOP_SEQ only; every provider's cost there, as at 8192, is linear in S
# (softmax: quadratic), so the ratio at 1024 is the one at 8192 up to the kernels' fixed costs.
ROUNDS = {"pyattn-linear": 9, "torch-chunked": 5, "torch-token-loop": 2, "pyattn-softmax": 2}
SEQS = [1024, S]
TOKEN_LOOP_SEQ = 1024


def _skip_slow(provider: str, seq: int) -> None:
    if provider == "torch-token-loop" and seq != TOKEN_LOOP_SEQ:
        pytest.skip(f"the token loop takes minutes at S={seq}; it is compared at S={TOKEN_LOOP_SEQ}")


def inputs(grad: bool, seq: int = S):
    torch.manual_seed(0)
    return [torch.randn(B, H, seq, D, requires_grad=grad) for _ in range(3)]


def forward_step(fn, q, k, v):
    def step():
        with torch.no_grad():
            fn(q, k, v)
    return step


def forward_backward_step(fn, q, k, v):
    dout = torch.randn(q.shape)

    def step():
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return step


def decode_state(context: int):
    """The state after `context` tokens (a chunked prefill) and the next token's q, k, v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, context + 1, D) for _ in range(3))
    with torch.no_grad():
        _, state = pyattn.linear_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], output_final_state=True,
                                           backend="cpu")
    return state, (q[:, :, -1:], k[:, :, -1:], v[:, :, -1:]), (k[:, :, :-1], v[:, :, :-1])


def _flags(args) -> list:
    """The command-line flags that reproduce `args` (switches only when on; --json left out)."""
    out = []
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        if key == "json" or value is False:
            continue
        out.append(flag if value is True else f"{flag} {value}")
    return out


def decode_steps(context: int):
    """(linear decoding step, softmax decoding step over a KV cache of `context` tokens)."""
    state, (q1, k1, v1), (k_cache, v_cache) = decode_state(context)

    def linear():
        with torch.no_grad():
            pyattn.linear_attention(q1, k1, v1, initial_state=state, output_final_state=True, backend="cpu")

    def softmax():
        with torch.no_grad():
            pyattn.attention(q1, k_cache, v_cache, causal=True, backend="cpu")
    return linear, softmax


def _info(benchmark, **extra):
    benchmark.extra_info.update(shape=f"B{B}-H{H}-D{D}-fp32", threads=torch.get_num_threads(), **extra)


@pytest.mark.parametrize("seq", SEQS, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward(benchmark, provider, seq):
    _skip_slow(provider, seq)
    step = forward_step(PROVIDERS[provider], *inputs(grad=False, seq=seq))
    benchmark.pedantic(step, rounds=ROUNDS[provider], warmup_rounds=1)
    _info(benchmark, seq=seq)


@pytest.mark.parametrize("seq", SEQS, ids=lambda s: f"S{s}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_forward_backward(benchmark, provider, seq):
    _skip_slow(provider, seq)
    step = forward_backward_step(PROVIDERS[provider], *inputs(grad=True, seq=seq))
    benchmark.pedantic(step, rounds=ROUNDS[provider], warmup_rounds=1 if ROUNDS[provider] > 1 else 0)
    _info(benchmark, seq=seq)


@pytest.mark.parametrize("context", DECODE_CONTEXTS, ids=lambda c: f"ctx{c // 1024}k")
@pytest.mark.parametrize("provider", ["pyattn-linear", "pyattn-softmax"])
def test_decode_step(benchmark, provider, context):
    linear, softmax = decode_steps(context)
    benchmark.pedantic(linear if provider == "pyattn-linear" else softmax, rounds=200, warmup_rounds=20)
    _info(benchmark, context=context)


# --------------------------------------------------------------------------- paired ratios

def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(fns, rounds: int):
    """Per provider the median time, and per other provider the median of its per-round time
    divided by the first provider's (calls alternate within each round)."""
    for fn in fns:
        fn()
    times = [[timed(fn) for fn in fns] for _ in range(rounds)]
    medians = [statistics.median(t[i] for t in times) for i in range(len(fns))]
    ratios = [statistics.median(t[i] / t[0] for t in times) for i in range(len(fns))]
    return medians, ratios




def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--token-loop-rounds", type=int, default=3)
    parser.add_argument("--token-loop-seq", type=int, default=TOKEN_LOOP_SEQ)
    parser.add_argument("--decode-steps", type=int, default=300)
    parser.add_argument("--json")
    parser.add_argument("--decode-only", action="store_true")
    args = parser.parse_args()
    rows = []

    def report(name, names, medians, ratios):
        row = dict(case=name, ms={n: 1e3 * m for n, m in zip(names, medians)},
                   speedup_median_of_ratios={n: r for n, r in zip(names[1:], ratios[1:])})
        rows.append(row)
        text = "  ".join(f"{n} {1e3 * m:.2f} ms" for n, m in zip(names, medians))
        speedups = "  ".join(f"vs {n}: {r:.2f}x" for n, r in zip(names[1:], ratios[1:]))
        print(f"{name:28} {text}\n{'':28} pyattn-linear speedup (median of paired ratios) {speedups}", flush=True)

    modes = () if args.decode_only else (("fwd", forward_step, False), ("fwd+bwd", forward_backward_step, True))
    for mode, make_step, grad in modes:
        q, k, v = inputs(grad)
        names = ["pyattn-linear", "torch-chunked", "pyattn-softmax"]
        medians, ratios = paired([make_step(PROVIDERS[n], q, k, v) for n in names], args.rounds)
        report(f"{mode} S={S}", names, medians, ratios)
        q, k, v = inputs(grad, args.token_loop_seq)
        names = ["pyattn-linear", "torch-token-loop"]
        medians, ratios = paired([make_step(PROVIDERS[n], q, k, v) for n in names], args.token_loop_rounds)
        report(f"{mode} S={args.token_loop_seq}", names, medians, ratios)

    # Decoding: the linear steps at every context alternate in each round (ratios against the 1k
    # step); softmax decoding is timed in rounds of its own (after a softmax step over a long KV
    # cache, whatever runs next starts with cold caches).
    steps = {c: decode_steps(c) for c in DECODE_CONTEXTS}
    medians, ratios = paired([steps[c][0] for c in DECODE_CONTEXTS], args.decode_steps)
    soft, _ = paired([steps[c][1] for c in DECODE_CONTEXTS], max(5, args.decode_steps // 10))
    for c, m, r, sm in zip(DECODE_CONTEXTS, medians, ratios, soft):
        rows.append(dict(case=f"decode ctx={c}", linear_us=1e6 * m, time_vs_1k_median_of_ratios=r,
                         softmax_us=1e6 * sm))
        print(f"decode ctx={c:6}  linear step {1e6 * m:7.1f} us (x{r:.3f} of the 1k step, median of paired "
              f"ratios)  softmax step {1e6 * sm:8.1f} us", flush=True)
    # memory: resident set size across many decoding steps carrying the state along
    state, (q1, k1, v1), _ = decode_state(DECODE_CONTEXTS[0])
    with torch.no_grad():
        for _ in range(200):
            _, state = pyattn.linear_attention(q1, k1, v1, initial_state=state, output_final_state=True,
                                               backend="cpu")
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(5000):
            _, state = pyattn.linear_attention(q1, k1, v1, initial_state=state, output_final_state=True,
                                               backend="cpu")
        rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_kib = sum(x.numel() * x.element_size() for x in state) / 1024
    rows.append(dict(case="decode memory", state_kib=state_kib, peak_rss_growth_kib_over_5000_steps=rss1 - rss0))
    print(f"decode memory: state {state_kib:.0f} KiB; peak RSS grew {rss1 - rss0} KiB over 5000 more steps")

    if args.json:
        record = dict(date=datetime.date.today().isoformat(), machine=cpu_model(),
                      isa=pyattn._extension.load_cpu().current_isa(), threads=torch.get_num_threads(),
                      torch=torch.__version__, shape=dict(batch=B, heads=H, seq=S, dim=D), rounds=args.rounds,
                      command="python bench/bench_linear.py " + " ".join(_flags(args)),
                      results=rows)
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
