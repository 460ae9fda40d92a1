"""Plain-text tables: the providers' status, then one table per (shape, dtype, causal, pass)."""
from __future__ import annotations

from typing import Dict, List, Optional

_REASON_WIDTH = 150


def _short(text: Optional[str], width: int = _REASON_WIDTH) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _num(x: Optional[float], digits: int = 3) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def providers_table(statuses: List[dict]) -> str:
    width = max(len(s["name"]) for s in statuses) if statuses else 8
    lines = ["providers:"]
    for s in statuses:
        state = "available" if s["status"] == "available" else "skipped: " + _short(s["reason"])
        lines.append(f"  {s['name']:<{width}}  {state}")
    return "\n".join(lines)


def result_tables(rows: List[dict], memory_bound: bool, unavailable: Optional[set] = None) -> str:
    """One table per case; providers skipped by their probe are left out (`providers_table` says why)."""
    unavailable = unavailable or set()
    groups: Dict[tuple, List[dict]] = {}
    for r in rows:
        groups.setdefault((r["shape_id"], r["dtype"], r["causal"], r["pass"]), []).append(r)
    out = []
    for (shape_id, dtype, causal, pass_), group in groups.items():
        family = group[0]["family"]
        base = next((r["baseline"] for r in group if r["baseline"]), None)
        title = (f"{family} {shape_id} {dtype} {'causal' if causal else 'non-causal'} {pass_}"
                 + (f"   (ratio: {base} ms / provider ms)" if base else "   (no baseline ran)"))
        header = ["provider", "ms", "±IQR", "TFLOP/s"] + (["GB/s"] if memory_bound else []) + ["peak MiB", "ratio"]
        body = []
        notes = []
        for r in group:
            if r["status"] == "ok":
                cells = [r["provider"], _num(r["ms_median"], 4), _num(r["ms_spread"], 2), _num(r["tflops"])]
                if memory_bound:
                    cells.append(_num(r["gbps"]))
                cells += [_num(r["peak_mem_mib"]), "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"]
                body.append(cells)
            elif r["provider"] not in unavailable:
                notes.append(f"  {r['status']:7}  {r['provider']}: {_short(r['reason'])}")
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]

        def fmt(cells):
            return "  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        out.append("\n".join([title, fmt(header)] + [fmt(b) for b in body] + notes))
    return "\n\n".join(out)
