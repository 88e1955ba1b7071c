"""The suite's outputs: ``latest.json``, the Markdown table ``latest.md`` and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .common import Report, Row, Series, log

COLUMNS = ("floor", "aiofiles", "aiosqlite")
HEADINGS = {"floor": "floor", "aiofiles": "aiofiles JSON-lines log", "aiosqlite": "aiosqlite WAL"}


def fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "n/a"
    if unit in ("ev/s",):
        if value >= 1e6:
            return f"{value / 1e6:,.2f}M ev/s"
        return f"{value / 1e3:,.1f}k ev/s" if value >= 1e3 else f"{value:,.0f} ev/s"
    if unit in ("ms", "µs"):
        return f"{value:,.2f} {unit}" if value < 100 else f"{value:,.0f} {unit}"
    return f"{value:,.1f} {unit}"


def short(series: Series) -> str:
    """How the ratio column names a baseline."""
    if series.role in COLUMNS or series.role != "other":
        return series.role
    words = series.label.split()
    return " ".join(words[:4]) + ("…" if len(words) > 4 else "")


def cell(series: Series | None, unit: str, *, label: bool) -> str:
    if series is None:
        return "—"
    text = fmt(series.value, unit)
    return f"{text} ({series.label})" if label else text


def result(row: Row) -> str:
    verdicts = []
    for target in row.targets:
        met = row.judge(target)
        verdicts.append("n/a" if met is None else ("met" if met else "**missed**"))
    return ", ".join(verdicts) or "—"


def render_markdown(report: Report) -> str:
    s, m = report.settings, report.machine
    loaded = report.notes.get("loaded_machine")
    lines = [
        "## apersist benchmark suite",
        "",
        f"{'Quick (smoke) run' if s.get('quick') else 'Full run'}: N = {s['events']:,} events, "
        f"batches of {s['batch']:,}, {s['repeats']} repeats per contender (value = median), "
        "contenders interleaved with the order rotated every repeat. "
        "Ratio = apersist / baseline: above 1 means faster for a rate (ev/s, MiB/s), "
        "slower for a time (ms, µs) or a size (MiB).",
        "",
    ]
    if report.errors:
        lines += ["**Workloads that failed** (their rows are missing):", ""]
        lines += [f"- {error}" for error in report.errors] + [""]
    if loaded:
        lines += [f"**Measured on a loaded machine** ({loaded}): read the ratios, not the absolute "
                  "numbers, and re-run on a quiet machine before quoting them.", ""]
    lines += [
        "| workload | backend | apersist | floor | aiofiles JSON-lines log | aiosqlite WAL "
        "| other baselines | ratio (apersist / baseline) | target | result |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- | --- |",
    ]
    footnotes: list[str] = []
    for row in report.rows:
        mark = ""
        if row.note:
            footnotes.append(row.note)
            mark = f" [{len(footnotes)}]"
        fixed = [row.baseline(role) for role in COLUMNS]
        others = [b for b in row.baselines if b.role not in COLUMNS]
        other = "; ".join(f"{b.label}: {fmt(b.value, row.unit)}" for b in others) or "—"
        ratios = ", ".join(f"{row.ratio(b):.2f}x {short(b)}" for b in row.baselines) or "—"
        targets = ", ".join(t.describe(row.unit) for t in row.targets) or "—"
        floor_cell = cell(fixed[0], row.unit, label=True)
        lines.append(
            f"| {row.workload}{mark} | {row.backend} | {cell(row.apersist, row.unit, label=False)} | "
            f"{floor_cell} | {cell(fixed[1], row.unit, label=False)} | "
            f"{cell(fixed[2], row.unit, label=False)} | {other} | {ratios} | {targets} | "
            f"{result(row)} |")
    met = [row.judge(t) for row in report.rows for t in row.targets]
    lines += [""] + [f"[{i}] {note}  " for i, note in enumerate(footnotes, 1)]
    lines += ["", f"Targets: {sum(1 for x in met if x)} met, {sum(1 for x in met if x is False)} "
              f"missed, {sum(1 for x in met if x is None)} not measured.", "", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in m.items()]
    lines += ["", "Notes:", ""]
    lines += [f"- {key}: {value}" for key, value in report.notes.items()]
    lines += [f"- runtime: {report.runtime_s:.1f} s", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def write_plots(report: Report, directory: Path) -> list[Path]:
    """PNG plots of the series the workloads left in ``report.series``; their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    loaded = report.notes.get("loaded_machine")
    tag = " — loaded machine" if loaded else ""
    subtitle = f"N = {report.settings['events']:,}{tag}"

    def save(fig: Any, name: str) -> None:
        path = directory / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    series = report.series
    if "throughput" in series:
        groups = series["throughput"]
        fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 * len(groups) + 0.6))
        axes = list(axes) if len(groups) > 1 else [axes]
        for ax, (title, bars) in zip(axes, groups.items(), strict=True):
            names = list(bars)
            values = [bars[name] / 1e6 for name in names]
            colors = ["tab:blue" if name.startswith("apersist") else "tab:gray" for name in names]
            ax.barh(names, values, color=colors)
            ax.invert_yaxis()
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("million events / s")
            for y, v in enumerate(values):
                ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
            ax.set_xlim(0, max(values, default=1) * 1.15 or 1)
        fig.suptitle(f"Throughput, filesystem ({subtitle})", fontsize=11)
        save(fig, "throughput.png")
    if "commit_latency" in series:
        data = series["commit_latency"]
        producers = [int(p) for p in data]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        names = ["apersist", "floor", "bare", "aiofiles", "aiosqlite"]
        labels = {"apersist": "apersist record + commit", "floor": "write + fsync (floor)",
                  "bare": "apersist's own I/O, bare", "aiofiles": "aiofiles log: line + fsync",
                  "aiosqlite": "aiosqlite WAL: insert + commit"}
        for i, name in enumerate(names):
            color = f"C{i}"
            ax.plot(producers, [data[str(p)][f"{name} p50"] for p in producers], "o-", color=color,
                    label=f"{labels[name]}, p50")
            ax.plot(producers, [data[str(p)][f"{name} p99"] for p in producers], "o--", color=color,
                    alpha=0.5, label="… p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(producers, [str(p) for p in producers])
        ax.set_xlabel("concurrent producers")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(f"Commit latency, snapshot_interval_ms=0 ({subtitle})", fontsize=11)
        ax.legend(fontsize=7, ncol=2)
        save(fig, "commit_latency.png")
    def log_log(data: dict[str, dict[str, float]], labels: dict[str, str], xlabel: str,
                ylabel: str, title: str, name: str, dashed: str = "") -> None:
        """Lines of ``data`` (x -> series -> y) on log-log axes; series named with
        ``dashed`` in them are dashed (a baseline)."""
        xs = [int(x) for x in data]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label in labels.items():
            style = "o--" if dashed and dashed in key else "o-"
            ax.plot(xs, [data[str(x)][key] for x in xs], style, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
        ax.legend(fontsize=8)
        save(fig, name)

    if "table_rebuild_ms" in series:
        log_log(series["table_rebuild_ms"],
                {"apersist": "apersist run.table()", "long": "apersist, 4x longer history",
                 "floor": "orjson.loads into a dict (floor)", "sqlite": "aiosqlite SELECT + loads"},
                "keys in the table (state size)", "rebuild time, ms (log)",
                f"Table rebuild against state size{tag}", "table_rebuild.png")
    if "history_ms" in series:
        log_log(series["history_ms"],
                {"open": "open, N one-event commits", "base open": "open, N/100 commits",
                 "replay": "replay, N one-event commits", "base replay": "replay, N/100 commits"},
                "events N (one commit each in the long store)", "ms (log)",
                f"Open and replay against history, filesystem{tag}", "history.png",
                dashed="base")
    if "peak_rss_mib" in series:
        data = series["peak_rss_mib"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        labels = {"apersist": "apersist record()", "none": "the loop alone (no recording)"}
        for name, points in data.items():
            sizes = [int(n) for n in points]
            ax.plot(sizes, list(points.values()), "o-", label=labels.get(name, name))
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("events recorded")
        ax.set_ylabel("peak RSS, MiB (VmHWM)")
        ax.set_title(f"Peak memory while recording (one process per size){tag}", fontsize=11)
        ax.legend(fontsize=8)
        save(fig, "memory.png")
    if "latency" in series:
        save(latency_figure(plt, series["latency"], tag), "latency.png")
    log(f"wrote {len(written)} plots into {directory}")
    return written


LATENCY_BARS = (("commit_1_ms", "commit, 1 segment"), ("commit_16_ms", "commit, 16 segments"),
                ("replay_ahead_s", "replay, read-ahead"), ("replay_one_s", "replay, 1 GET at a time"),
                ("open_writer_ms", "open the long store (writer)"))


def latency_figure(plt: Any, data: dict[str, dict[str, dict[str, Any]]], tag: str) -> Any:
    """Bars per backend: each latency workload's time at each delay per request (latency.py)."""
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4.4), squeeze=False)
    for ax, (backend, by_delay) in zip(axes[0], data.items(), strict=True):
        delays = sorted(by_delay, key=float)
        width = 0.8 / max(1, len(delays))
        for index, delay in enumerate(delays):
            values = by_delay[delay]
            heights = [values.get(key, float("nan")) * (1000 if key.endswith("_s") else 1)
                       for key, _label in LATENCY_BARS]
            ax.bar([i + index * width for i in range(len(LATENCY_BARS))], heights, width,
                   label=f"{float(delay):g} ms per request")
        ax.set_xticks([i + width * (len(delays) - 1) / 2 for i in range(len(LATENCY_BARS))])
        ax.set_xticklabels([label for _key, label in LATENCY_BARS], rotation=30, ha="right",
                           fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("ms (log)")
        ax.set_title(f"{backend}{tag}", fontsize=11)
        ax.legend(fontsize=8)
    return fig


# --------------------------------------------------------------------------- comparison


def render_comparison(report: Report, previous: dict[str, Any], source: str) -> str:
    """A table of each row's ratio to its first baseline, then and now (``--compare``).

    Rows are matched by workload and backend. A ratio, unlike an absolute number, should
    not move when the machine changes; a drop of more than the run-to-run spread (see the
    samples' min and max in the JSON) is a regression worth a second run.
    """
    then: dict[tuple[str, str], dict[str, Any]] = {
        (row["workload"], row["backend"]): row for row in previous.get("rows", [])}
    lines = [f"## Against {source}", "",
             "| workload | backend | first baseline | ratio then | ratio now | now / then |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for row in report.rows:
        old = then.get((row.workload, row.backend))
        if old is None or not row.baselines or not old["baselines"]:
            continue
        base = row.baselines[0]
        before = old["ratios"].get(old["baselines"][0]["label"], float("nan"))
        now = row.ratio(base)
        change = now / before if before else float("nan")
        flag = ""
        if change == change:
            worse = change < 0.8 if row.unit in ("ev/s", "MiB/s") else change > 1.25
            flag = " **worse**" if worse else ""
        lines.append(f"| {row.workload} | {row.backend} | {base.label} | {before:.2f}x | "
                     f"{now:.2f}x | {change:.2f}{flag} |")
    lines += ["", "Flagged: more than 20 % worse (a rate's ratio below 0.8x of before, a time's "
              "above 1.25x). Repeat the run before believing a flag on a loaded machine.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- docs


DOCS_START = "<!-- results:start -->"
DOCS_END = "<!-- results:end -->"


def render_docs_block(report: Report, plots: list[Path], docs: Path) -> str:
    """The results section of docs/performance.md: what ran, where, the plots, the table."""
    import os

    s, m = report.settings, report.machine
    loaded = report.notes.get("loaded_machine")
    lines = [
        DOCS_START,
        "<!-- Written by `python -m benchmarks` (a full-size or custom run that writes to the "
        "default places); edit outside these markers. -->",
        "",
        f"Run of {s.get('started_utc', '?')}: `{s.get('command', 'python -m benchmarks')}`; "
        f"N = {s['events']:,} events, {s['repeats']} repeats, peak memory at "
        f"{', '.join(f'{n:,}' for n in s['memory_events'])} events, tables of "
        f"{', '.join(f'{n:,}' for n in s['table_sizes'])} keys, {s['backend_events']:,} events "
        f"on the object stores. Machine: {m['cpu']}, {m['cores']} cores, {m['python']}, "
        f"{m['filesystem']}. Every sample, the versions and the notes are in "
        "[benchmarks/results/latest.json](../benchmarks/results/latest.json) and "
        "[latest.md](../benchmarks/results/latest.md).",
        "",
    ]
    if loaded:
        lines += [f"**These figures are from a loaded machine** ({loaded}): other jobs shared "
                  "the cores, so absolute numbers are low and noisy and only large ratios mean "
                  "much. Re-run on a quiet machine before quoting them.", ""]
    if report.errors:
        lines += ["Workloads that failed in this run: " + "; ".join(report.errors), ""]
    for path in plots:
        lines += [f"![{path.stem.replace('_', ' ')}]({os.path.relpath(path, docs.parent)})", ""]
    table = render_markdown(report)
    start = table.index("| workload |")
    end = table.index("\nMachine:")
    lines += [table[start:end].rstrip(), "", DOCS_END]
    return "\n".join(lines)


def update_docs(report: Report, plots: list[Path], docs: Path) -> bool:
    """Replace the block between the markers in ``docs``; False if it has no markers."""
    if not docs.is_file():
        return False
    text = docs.read_text(encoding="utf-8")
    if DOCS_START not in text or DOCS_END not in text:
        return False
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    docs.write_text(head + render_docs_block(report, plots, docs) + tail, encoding="utf-8")
    log(f"updated the results in {docs}")
    return True
