"""The tables and the figure of a sweep's records (``memory.py``, ``speed.py``): a markdown table per pass,
one row per token count and one column per implementation; a figure with a row per pass and a panel per
metric, a horizontal bar per implementation and token count, each labelled with its value and how
``BASELINE`` compares with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from harness import PASSES, flops_formula


# --- tables ----------------------------------------------------------------------------------------------

PASS_TITLES = {
    "fwd": "forward only under no_grad (log-probs of the sampled tokens, as for old/ref log-probs)",
    "fwd+bwd": "loss step, forward + backward into hidden and weight",
}


def measured_where(env: dict) -> str:
    where = env.get("gpu") or f"{env['cpu']} ({env['torch_threads']} threads)"
    commit = (env["git_commit"] or "unknown")[:7] + {True: "+dirty", False: "", None: ""}[env["git_dirty"]]
    return f"{where}, torch {env['versions']['torch']}, commit {commit}, {env['date'][:10]}"


def format_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def passes_of(records: list[dict]) -> list[str]:
    return [p for p in PASSES if any(r["pass"] == p for r in records)]


def markdown_tables(records: list[dict], cell: Callable[[dict], str]) -> str:
    """Per pass, one row per token count and one column per implementation; non-ok cells show the status."""
    tables = []
    for pass_ in passes_of(records):
        of_pass = [r for r in records if r["pass"] == pass_]
        impls = list(dict.fromkeys(r["impl"] for r in of_pass))
        by_key = {(r["tokens"], r["impl"]): r for r in of_pass}
        rows = [
            f"{pass_}: {PASS_TITLES[pass_]}\n",
            "| tokens | " + " | ".join(impls) + " |",
            "|---:|" + "---:|" * len(impls),
        ]
        for tokens in sorted({r["tokens"] for r in of_pass}):
            cells = []
            for impl in impls:
                record = by_key.get((tokens, impl))
                cells.append("" if record is None else cell(record) if record["status"] == "ok" else record["status"])
            rows.append(f"| {tokens} | " + " | ".join(cells) + " |")
        tables.append("\n".join(rows))
    return "\n\n".join(tables)


# --- the figure ------------------------------------------------------------------------------------------

BASELINE = "apo_kernels"  # the implementation the figures compare every other one with, per token count
BYTE_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
SECOND_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6))
LABEL_FONTSIZE = 8.5
PASS_SHORT = {"fwd": "log-probs under no_grad", "fwd+bwd": "loss step, forward + backward"}
FIGURE_NOTE = (
    f"Linear axes. Each bar is labelled with its value and, for the other implementations, how {BASELINE} "
    "compares with it at the same N. Cases that ran out of memory, were skipped or failed are named, "
    "not drawn."
)


@dataclass(frozen=True)
class Panel:
    """One metric of a figure: a horizontal bar per implementation and token count, on a linear axis."""

    field: str  # record field
    label: str  # axis label; {unit} becomes the axis unit, {flops} the pass's FLOP count
    units: Sequence[tuple[str, float]]  # (name, scale), largest first: the axis takes the largest its maximum reaches
    value_text: Callable[[float], str]  # the label of a bar
    # How the baseline compares with a larger value, a smaller one and about the same, each after the
    # baseline's name with {} the factor, e.g. ("{}x faster", "{}x slower", "about as fast") for time; None:
    # no comparison.
    compare: Optional[tuple[str, str, str]] = None
    detail: Optional[Callable[[dict], Optional[str]]] = None  # more of a record to add to its label, if any


def compare_text(value: float, baseline: float, phrases: tuple[str, str, str]) -> str:
    """``apo_kernels 2.1x faster`` when ``value`` (a peer's time) is 2.1 times ``baseline`` (apo_kernels') and
    ``phrases`` is :class:`Panel`'s ``("{}x faster", "{}x slower", "about as fast")``."""
    ratio = value / baseline
    larger, smaller, same = phrases
    if f"{ratio:.1f}" == "1.0" or f"{1 / ratio:.1f}" == "1.0":
        return f"{BASELINE} {same} ({ratio:.2f}x)"
    return f"{BASELINE} " + (larger.format(f"{ratio:.1f}") if ratio > 1 else smaller.format(f"{1 / ratio:.1f}"))


@dataclass
class BarLabel:
    """A bar's label, its value and (for a peer of the baseline) the comparison, as two texts: one inside
    the bar's end (white), one to its right."""

    x: float  # where the bar ends, in data units
    value: str
    comparison: Optional[str]
    inner: object  # matplotlib Text, right-aligned at x
    outer: object  # matplotlib Text, left-aligned at x

    def options(self) -> list[tuple[str, str]]:
        """(inside, outside) texts, in order of preference: all to the right, all inside, split."""
        full = self.value if self.comparison is None else f"{self.value}  |  {self.comparison}"
        options = [("", f" {full}"), (f"{full} ", "")]
        if self.comparison is not None:
            options.append((f"{self.value} ", f" {self.comparison}"))
        return options


def _draw_panel(ax, panel: Panel, pass_: str, by_key: dict, impls: list[str], tokens: list[int], colors: dict) -> list:
    """A group of bars per token count (the smallest on top), a bar per implementation, each labelled;
    returns the labels of the bars."""
    labels = []
    values = [r[panel.field] for r in by_key.values() if r["status"] == "ok" and r[panel.field] is not None]
    top = max(values, default=0.0)
    unit, scale = next(((name, s) for name, s in panel.units if top >= s), panel.units[-1])
    ticks, tick_labels = [], []
    y = 0
    for n in tokens:
        ax.text(
            0.01,
            y,
            f"N = {n} tokens",
            transform=ax.get_yaxis_transform(),
            ha="left",
            va="center",
            fontsize=9,
            fontweight="bold",
        )
        baseline = by_key.get((n, BASELINE))
        baseline_value = baseline[panel.field] if baseline is not None and baseline["status"] == "ok" else None
        for impl in impls:
            y += 1
            ticks.append(y)
            tick_labels.append(impl)
            record = by_key.get((n, impl))
            if record is None:
                continue
            value = record[panel.field] if record["status"] == "ok" else None
            if value is None:
                ax.text(
                    0,
                    y,
                    f" {record['status']}",
                    ha="left",
                    va="center",
                    fontsize=LABEL_FONTSIZE,
                    style="italic",
                    color="0.35",
                )
                continue
            ax.barh(y, value / scale, height=0.72, color=colors[impl])
            text = panel.value_text(value)
            detail = panel.detail(record) if panel.detail is not None else None
            if detail:
                text += f" ({detail})"
            comparison = None
            if panel.compare and baseline_value and impl != BASELINE:
                comparison = compare_text(value, baseline_value, panel.compare)
            style = dict(va="center", fontsize=LABEL_FONTSIZE, fontweight="bold" if impl == BASELINE else "normal")
            # Placed by _fit_labels: to the right of the bar, in it, or the value in it and the comparison right.
            labels.append(
                BarLabel(
                    value / scale,
                    text,
                    comparison,
                    ax.text(value / scale, y, "", ha="right", color="white", **style),
                    ax.text(value / scale, y, "", ha="left", **style),
                )
            )
        y += 1
    ax.set_yticks(ticks, tick_labels, fontsize=LABEL_FONTSIZE)
    ax.set_ylim(y - 0.4, -0.6)  # inverted: the first token count on top
    ax.set_xlim(0, top / scale * 1.02 if top else 1)
    ax.set_title(f"{pass_}: {PASS_SHORT[pass_]}", fontsize=10)
    ax.set_xlabel(panel.label.format(unit=unit, flops=flops_formula(pass_)), fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_axisbelow(True)
    return labels


def _fit_labels(fig, labels_of: dict) -> None:
    """Place each bar label where it stays inside its axes and its bar (:meth:`BarLabel.options`); where
    none fits, the axis grows until one does."""
    renderer = fig.canvas.get_renderer()

    def fits(text_obj, text: str, room: float) -> bool:
        if not text:
            return True
        text_obj.set_text(text)
        return text_obj.get_window_extent(renderer).width <= room - 3

    for _ in range(30):
        grow = set()
        for ax, labels in labels_of.items():
            right = ax.get_window_extent(renderer).x1
            zero = ax.transData.transform((0, 0))[0]
            for label in labels:
                end = ax.transData.transform((label.x, 0))[0]
                fitting = [
                    (inside, outside)
                    for inside, outside in label.options()
                    if fits(label.inner, inside, end - zero) and fits(label.outer, outside, right - end)
                ]
                if not fitting:
                    grow.add(ax)
                    fitting = label.options()[:1]
                label.inner.set_text(fitting[0][0])
                label.outer.set_text(fitting[0][1])
        if not grow:
            return
        for ax in grow:
            low, high = ax.get_xlim()
            ax.set_xlim(low, high * 1.05)


def figure(records: list[dict], panels: Sequence[Panel], title: str):
    """A row per pass, a column per panel; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    all_impls = list(dict.fromkeys(r["impl"] for r in records))
    colors = {impl: f"C{i}" for i, impl in enumerate(all_impls)}  # the same in every panel
    rows = []
    for pass_ in passes_of(records):
        of_pass = [r for r in records if r["pass"] == pass_]
        impls = [impl for impl in all_impls if any(r["impl"] == impl for r in of_pass)]
        rows.append(
            (pass_, {(r["tokens"], r["impl"]): r for r in of_pass}, impls, sorted({r["tokens"] for r in of_pass}))
        )
    heights = [0.25 * len(tokens) * (len(impls) + 1) + 1.2 for _, _, impls, tokens in rows]
    title_in, note_in = 0.25 + 0.2 * title.count("\n"), 0.35
    fig_height = sum(heights) + title_in + note_in
    fig, axes = plt.subplots(
        len(rows),
        len(panels),
        figsize=(7 * len(panels), fig_height),
        squeeze=False,
        gridspec_kw={"height_ratios": heights},
    )
    labels_of = {}
    for ax_row, (pass_, by_key, impls, tokens) in zip(axes, rows):
        for ax, panel in zip(ax_row, panels):
            labels_of[ax] = _draw_panel(ax, panel, pass_, by_key, impls, tokens, colors)
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.08 / fig_height, FIGURE_NOTE, ha="center", va="bottom", fontsize=8, color="0.3", wrap=True)
    layout = dict(rect=(0, note_in / fig_height, 1, 1 - 0.1 / fig_height), h_pad=1.5)
    fig.tight_layout(**layout)
    _fit_labels(fig, labels_of)
    fig.tight_layout(**layout)  # the axes' tick labels may have changed
    return fig


def plot(records: list[dict], panels: Sequence[Panel], title: str, path: Path) -> None:
    """Draw :func:`figure` into ``path`` (PNG, with ``title`` also as its Title metadata)."""
    import matplotlib.pyplot as plt

    fig = figure(records, panels, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Title": title})
    plt.close(fig)
