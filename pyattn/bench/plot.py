"""``--plot FILE.png``: TFLOP/s against sequence length, one line per provider.

One panel per (dtype, causal, pass) of the run. pyattn's providers are solid lines,
the others dashed; bars span the interquartile range of the times. The y axis is
logarithmic when the providers are more than 30x apart. Needs matplotlib (``pip install 'pyattn[plot]'``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

_LOG_RANGE = 30  # a log y axis when the fastest provider is more than this many times the slowest


def require_matplotlib() -> None:
    """Raises ImportError with the install hint if matplotlib is missing (checked before a run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("--plot needs matplotlib: pip install 'pyattn[plot]' (or pip install matplotlib)") from None


def plot(record: dict, path: str) -> None:
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: Dict[Tuple, Dict[str, List[Tuple[int, float]]]] = {}
    for r in record["results"]:
        key = (r["dtype"], r["causal"], r["pass"])
        lines = panels.setdefault(key, {})
        if r["status"] == "ok":  # the bar spans the interquartile range of the times
            low, high = r["flops"] / r["ms_p75"] / 1e9, r["flops"] / r["ms_p25"] / 1e9
            lines.setdefault(r["provider"], []).append((r["seq"], r["tflops"], low, high))
    keys = list(panels) or [("", False, "")]
    cols = min(len(keys), 2)
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.4 * rows), squeeze=False)
    names = sorted({name for lines in panels.values() for name in lines})
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    for ax, key in zip(axes.flat, keys):
        for name, points in sorted(panels.get(key, {}).items()):
            points.sort()
            xs, ys, lows, highs = zip(*points)
            errors = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=name, color=colors[name],
                        linestyle="-" if name.startswith("pyattn") else "--")
        dtype, causal, pass_ = key
        ax.set_title(f"{dtype}, {'causal' if causal else 'non-causal'}, {pass_}")
        ax.set_xscale("log", base=2)
        seqs = sorted({r["seq"] for r in record["results"]})
        if seqs:
            ax.set_xticks(seqs)
            ax.set_xticklabels([str(s) for s in seqs])
        ax.set_xlabel("sequence length" + (" (keys)" if record["family"] in ("decode", "cross") else ""))
        ax.set_ylabel("TFLOP/s")
        values = [p[1] for points in panels.get(key, {}).values() for p in points if p[1] > 0]
        if values and max(values) > _LOG_RANGE * min(values):
            ax.set_yscale("log")  # a token loop beside a fused kernel: on a linear axis one line is flat at 0
        else:
            ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    first = record["results"][0]["shape"] if record["results"] else None
    shape = "" if first is None else (
        f"B={first['batch']}, H={first['heads_q']}"
        + (f"/{first['heads_kv']}" if first["heads_kv"] != first["heads_q"] else "") + f", D={first['head_dim']}"
        + (f", Sq={first['seq_q']}" if record["family"] in ("decode", "cross") else ""))
    m = record["machine"]
    load = (f", load average {m['load_average'][0]:.1f}" if m["device"] == "cpu" and m.get("load_average")
            else "")
    fig.suptitle(f"pyattn-bench {record['family']}: {shape} (bars: interquartile range)\n{m['device_name']} "
                 f"({m['device']}, {m['threads']} threads{load}), torch {record['versions']['torch']}, "
                 f"{record['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
