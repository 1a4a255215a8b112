"""Reports of a policy comparison: a JSON file, a PNG figure and a table on stdout.

The JSON holds the caller's config, the comparison (summaries and ratios against the first policy)
and every run in full (records, counters, page history), so that a report can be re-plotted or
re-summarised later (`load_results`). The figure shows the CDFs of TTFT and TBT of every policy and,
per policy, the arena's pages by owner kind over time. matplotlib and rich are imported only when
needed; without rich the table is plain text.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from oneiros.bench.metrics import HEADLINE_METRICS, RequestRecord, lookup
from oneiros.bench.runner import RunResult, compare

PAGE_KINDS = ("resident", "slab", "kv", "free")  # stacking order, bottom to top
_KIND_COLORS = {"resident": "#4c9a2a", "slab": "#e8a33d", "kv": "#3b75af", "free": "#d9d9d9",
                "other": "#a05195"}


# ---- JSON ----------------------------------------------------------------------------------------


def report_dict(
    results: Mapping[str, RunResult],
    config: Mapping[str, Any] | None = None,
    slo_ttft_s: float | None = None,
    slo_tbt_s: float | None = None,
    repeats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a report holds: config, comparison, runs, and each run in the field names of
    `vllm bench serve` (under 'vllm', by policy; with one run, also at the top level, so a reader
    of vLLM's result files reads ours unchanged). `repeats`: the spread over repeated runs."""
    comparison = compare(results, slo_ttft_s, slo_tbt_s)
    vllm = {name: s["vllm"] for name, s in comparison["summaries"].items()}
    report: dict[str, Any] = {}
    if len(vllm) == 1:
        report.update(next(iter(vllm.values())))
    report.update({
        "config": dict(config or {}),
        "comparison": comparison,
        "vllm": vllm,
        "runs": {name: r.to_dict() for name, r in results.items()},
    })
    if repeats is not None:
        report["repeats"] = repeats
    return report


def write_report(
    results: Mapping[str, RunResult],
    out_json: str | Path | None,
    out_png: str | Path | None = None,
    config: Mapping[str, Any] | None = None,
    slo_ttft_s: float | None = None,
    slo_tbt_s: float | None = None,
    repeats: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the JSON report (and the figure when `out_png` is given); returns the report dict.
    Config values JSON cannot hold are written as strings."""
    report = report_dict(results, config, slo_ttft_s, slo_tbt_s, repeats)
    if out_json is not None:
        path = Path(out_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(report), indent=1, default=str) + "\n")
    if out_png is not None:
        plot_results(results, out_png)
    return report


def load_results(path: str | Path) -> dict[str, RunResult]:
    """The runs of a JSON report written by `write_report`, by policy."""
    report = json.loads(Path(path).read_text())
    return {name: RunResult.from_dict(run) for name, run in report["runs"].items()}


def _finite(value: Any) -> Any:
    """NaN and infinities as None: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# ---- figure --------------------------------------------------------------------------------------


def page_kind(owner: str) -> str:
    """The owner kind of a page-history key: 'free', 'a/kv' -> 'kv', 'a/slab' -> 'slab', ..."""
    kind = owner.rsplit("/", 1)[-1]
    return kind if kind in PAGE_KINDS else "other"


def pages_by_kind(
    history: Sequence[tuple[float, Mapping[str, int]]],
) -> tuple[list[float], dict[str, list[int]]]:
    """Times and, per owner kind (all models together), the pages it held at each time."""
    times = [t for t, _ in history]
    kinds = [*PAGE_KINDS, "other"]
    series: dict[str, list[int]] = {k: [0] * len(history) for k in kinds}
    for i, (_, usage) in enumerate(history):
        for owner, pages in usage.items():
            series[page_kind(owner)][i] += pages
    if not any(series["other"]):
        del series["other"]
    return times, series


def cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """Sorted values and their empirical cumulative fractions (k / n for the k-th smallest)."""
    xs = sorted(values)
    n = len(xs)
    return xs, [(k + 1) / n for k in range(n)]


def plot_results(results: Mapping[str, RunResult], path: str | Path) -> None:
    """A PNG: TTFT and TBT CDFs of every policy on top, then the pages-by-kind timeline of each
    policy (stacked areas, two per row). Uses matplotlib's Agg canvas directly, so it never touches
    pyplot's global state or needs a display."""
    from matplotlib.figure import Figure

    names = list(results)
    timeline_rows = math.ceil(len(names) / 2)
    fig = Figure(figsize=(12, 4 * (1 + timeline_rows)), layout="constrained")
    grid = fig.add_gridspec(1 + timeline_rows, 2)
    _plot_cdf(fig.add_subplot(grid[0, 0]), results, _ttfts, "TTFT")
    _plot_cdf(fig.add_subplot(grid[0, 1]), results, _tbts, "TBT")
    axes = _page_axes(results.values())
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[1 + i // 2, i % 2])
        _plot_pages(ax, results[name], name, axes)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def _ttfts(records: Sequence[RequestRecord]) -> list[float]:
    return [t for r in records if (t := r.ttft) is not None]


def _tbts(records: Sequence[RequestRecord]) -> list[float]:
    return [g for r in records for g in r.tbt]


def _plot_cdf(ax: Any, results: Mapping[str, RunResult], values: Any, label: str) -> None:
    """One CDF line per policy, in milliseconds; a log x axis when the values span more than two
    decades (preemption stalls next to ordinary decode gaps)."""
    positive: list[float] = []
    for name, result in results.items():
        ms = [v * 1e3 for v in values(result.records)]
        if not ms:
            continue
        xs, ys = cdf(ms)
        ax.step(xs, ys, where="post", label=name)
        positive += [x for x in xs if x > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_xscale("log")
    ax.set_xlabel(f"{label} (ms)")
    ax.set_ylabel("fraction of " + ("requests" if label == "TTFT" else "token gaps"))
    ax.set_title(f"{label} CDF")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")


def _page_axes(results: Any) -> tuple[float, int, int]:
    """(last time, total pages, axis floor) shared by every policy's page timeline, so that the
    panels compare at a glance."""
    end, total, floor = 0.0, 0, None
    for r in results:
        times, series = pages_by_kind(r.page_history)
        if not times:
            continue
        top = [sum(v) for v in zip(*series.values(), strict=True)]
        end = max(end, times[-1])
        total = max(total, max(top))
        f = _y_floor(series, max(top))
        floor = f if floor is None else min(floor, f)
    return end, total, floor or 0


def _plot_pages(
    ax: Any, result: RunResult, name: str, axes: tuple[float, int, int] | None = None
) -> None:
    """Stacked step areas of pages per owner kind over the run (on shared axes when given)."""
    times, series = pages_by_kind(result.page_history)
    title = f"{name}: arena pages by owner"
    if result.page_bytes:
        title += f" ({_size(result.page_bytes)} pages)"
    ax.set_title(title)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("pages")
    if not times:
        ax.text(0.5, 0.5, "no page history", ha="center", va="center", transform=ax.transAxes)
        return
    bottom = [0] * len(times)
    for kind, pages in series.items():
        top = [b + p for b, p in zip(bottom, pages, strict=True)]
        ax.fill_between(times, bottom, top, step="post", label=kind, color=_KIND_COLORS[kind],
                        linewidth=0)
        bottom = top
    end, total, floor = axes or (times[-1], max(bottom), _y_floor(series, max(bottom)))
    ax.set_xlim(min(0.0, times[0]), max(end, times[0] + 1e-9))
    ax.set_ylim(floor, total or 1)
    if floor > 0:
        ax.set_ylabel(f"pages (axis from {floor})")
    ax.legend(loc="upper right", fontsize="small")


def _y_floor(series: Mapping[str, Sequence[int]], total: int) -> int:
    """Where the pages axis starts. Parameters usually fill most of the arena and hardly move,
    which would squeeze the KV/free boundary (the interesting part) into a thin strip at the top:
    when the parameter pages never fall below half the arena, the axis starts below their lowest
    level by half the height of what does move."""
    params = [r + s for r, s in zip(series["resident"], series["slab"], strict=True)]
    low = min(params, default=0)
    if not total or low <= total / 2:
        return 0
    return max(0, int(low - (total - low) / 2))


def _size(nbytes: int) -> str:
    """2097152 -> '2 MiB', 65536 -> '64 KiB'."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:g} {unit}"
    return f"{nbytes} B"


# ---- table ---------------------------------------------------------------------------------------

# (column header, headline metric label, scale, number format)
_COLUMNS: tuple[tuple[str, str, float, str], ...] = (
    ("TTFT p50 ms", "ttft_p50", 1e3, ".1f"),
    ("TTFT p90 ms", "ttft_p90", 1e3, ".1f"),
    ("TTFT p99 ms", "ttft_p99", 1e3, ".1f"),
    ("TBT p50 ms", "tbt_p50", 1e3, ".1f"),
    ("TBT p99 ms", "tbt_p99", 1e3, ".1f"),
    ("TPOT p99 ms", "tpot_p99", 1e3, ".1f"),
    ("max gap p99 ms", "max_gap_p99", 1e3, ".1f"),
    ("tok/s", "throughput_tok_s", 1.0, ".1f"),
    ("goodput tok/s", "goodput_tok_s", 1.0, ".1f"),
    ("preempt", "preemptions", 1.0, ".0f"),
    ("remaps", "remapped_layers", 1.0, ".0f"),
)
_PATHS = {label: path for label, path, _ in HEADLINE_METRICS}


def table_rows(
    comparison: Mapping[str, Any], repeats: Mapping[str, Any] | None = None
) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the comparison table: one row per policy, each cell the value and, after
    the baseline row, its ratio to the baseline ('12.3 (0.52x)'); '-' where there is no value.
    With `repeats` (the spread over repeated runs) a cell is the mean and its half range
    ('12.3 ±0.4')."""
    headers = ["policy", *(c[0] for c in _COLUMNS), "rejected"]
    rows = []
    baseline = comparison["baseline"]
    for name, summary in comparison["summaries"].items():
        row = [name]
        for _, label, scale, fmt in _COLUMNS:
            value = lookup(summary, _PATHS[label])
            spread = (repeats or {}).get(name, {}).get(label)
            if spread is not None and spread["mean"] is not None:
                half = (spread["max"] - spread["min"]) / 2 * scale
                cell = f"{format(spread['mean'] * scale, fmt)} ±{format(half, fmt)}"
            else:
                cell = "-" if value is None else format(value * scale, fmt)
            r = comparison["ratios"][name].get(label)
            if name != baseline and value is not None and r is not None:
                cell += f" ({r:.2f}x)"
            row.append(cell)
        row.append(str(summary.get("rejected", 0)))
        rows.append(row)
    return headers, rows


# Columns left out first when the table is wider than the terminal.
_DROP_ORDER = ("TTFT p90 ms", "TBT p90 ms", "max gap p99 ms", "goodput tok/s", "TTFT p50 ms",
               "TBT p50 ms", "TPOT p99 ms", "rejected", "remaps", "preempt")


def fit_width(
    headers: list[str], rows: list[list[str]], width: int, gap: int = 3
) -> tuple[list[str], list[list[str]], list[str]]:
    """Drop columns (least important first) until the table fits `width` characters; returns
    the headers, rows and the dropped column names."""
    dropped: list[str] = []

    def needed() -> int:
        return sum(max(len(h), *(len(r[i]) for r in rows)) + gap for i, h in enumerate(headers))

    for name in _DROP_ORDER:
        if not rows or needed() <= width:
            break
        if name not in headers:
            continue
        i = headers.index(name)
        headers = headers[:i] + headers[i + 1:]
        rows = [r[:i] + r[i + 1:] for r in rows]
        dropped.append(name)
    return headers, rows, dropped


def format_plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A fixed-width text table (the fallback without rich)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def print_table(
    results_or_comparison: Mapping[str, RunResult] | Mapping[str, Any],
    slo_ttft_s: float | None = None,
    slo_tbt_s: float | None = None,
    file: IO[str] | None = None,
    use_rich: bool | None = None,
    repeats: Mapping[str, Any] | None = None,
    width: int | None = None,
) -> None:
    """Print P50/P90/P99 TTFT and TBT, throughput, goodput, preemptions and remap events per policy,
    with ratios against the first policy. Accepts the runs or an existing `compare` result. rich is
    used when installed (and `use_rich` is not False); otherwise a plain table. The table fits
    `width` (default: the terminal's), leaving out the least important columns if it must."""
    comparison = results_or_comparison
    notes: list[str] = []
    if "summaries" not in comparison:
        notes = input_notes(results_or_comparison)  # type: ignore[arg-type]
        comparison = compare(results_or_comparison, slo_ttft_s, slo_tbt_s)  # type: ignore[arg-type]
    width = width or shutil.get_terminal_size((120, 24)).columns
    headers, rows, dropped = fit_width(*table_rows(comparison, repeats), width)
    out = file if file is not None else sys.stdout
    title = f"ratios against {comparison['baseline']}"
    if repeats:
        runs = len(next(iter(next(iter(repeats.values())).values()))["values"])
        title += f"; mean ±half range of {runs} runs"
    if dropped:
        title += f"; left out to fit {width} columns: {', '.join(dropped)}"
    slo = comparison.get("slo") or {}
    if slo.get("ttft_s") is not None or slo.get("tbt_s") is not None:
        title += f"; goodput SLO: TTFT <= {slo.get('ttft_s')} s, P99 TBT <= {slo.get('tbt_s')} s"
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            if use_rich:
                raise
        else:
            table = Table(title=title)
            for i, h in enumerate(headers):
                table.add_column(h, justify="left" if i == 0 else "right")
            for row in rows:
                table.add_row(*row)
            widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
            Console(file=out, width=min(width, sum(w + 3 for w in widths) + 1)).print(table)
            for note in notes:
                print(note, file=out)
            return
    print(title, file=out)
    print(format_plain_table(headers, rows), file=out)
    for note in notes:
        print(note, file=out)


def input_notes(results: Mapping[str, RunResult]) -> list[str]:
    """What happened to the requests themselves, per run: how many were shortened to fit their
    model's context window and how many were refused, by kind, with the first reason of each."""
    notes = []
    for name, r in results.items():
        if r.clipped:
            notes.append(f"{name}: {r.clipped} requests shortened to fit their model's context")
        for kind, n in sorted(r.rejected.items()):
            why = r.rejected_examples.get(kind, "")
            notes.append(f"{name}: {n} requests rejected ({kind}): {why}")
    return notes
