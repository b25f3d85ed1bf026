"""What ``memory.py`` and ``speed.py`` are: a :class:`Script` each (what one case measures and how its
records read), which :func:`run_script` runs: as a worker, a listing of the cases, a replot of a results
file, or the whole sweep (tables, JSON and figure).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import harness
import report
from harness import Case
from impls import Inputs, Step


@dataclass(frozen=True)
class Script:
    """What distinguishes ``memory.py`` from ``speed.py``; :func:`run_script` does the rest."""

    name: str  # prefix of the result files
    path: Path  # the script, re-run as each group's worker
    description: str
    title: str  # what one pass measures, for the table and the figure
    cells: str  # what a table cell shows
    measure: Callable[[Step, Inputs, Case], dict]
    metrics: Sequence[str]
    describe: Callable[[dict], str]  # one progress line per case
    cell: Callable[[dict], str]
    panels: list[report.Panel]  # the figure's columns
    summary: Optional[Callable[[list[dict]], str]] = None
    cpu_tokens: Optional[list[int]] = None


def figure_title(script: Script, env: dict, settings: dict, records: list[dict]) -> str:
    """What was measured (shape, dtype, passes) and where (CPU model or GPU name, torch, commit, date)."""
    passes = " and ".join(report.passes_of(records))
    return (
        f"{script.title} ({passes}): D = {settings['hidden']}, V = {settings['vocab']}, {settings['dtype']}, "
        f"{harness.GROUP_SIZE} responses per micro-batch\n{env['device']}: {report.measured_where(env)}"
    )


def print_and_plot(script: Script, env: dict, settings: dict, records: list[dict], plot_path: Path) -> None:
    """The tables on stdout and the figure."""
    where = report.measured_where(env)
    title = f"{script.title}: {settings['dtype']}, D={settings['hidden']}, V={settings['vocab']}"
    print(f"\n{title}\nMeasured on {where}. Cells: {script.cells}.\n")
    print(report.markdown_tables(records, script.cell))
    if script.summary is not None:
        print("\n" + script.summary(records))
    report.plot(records, script.panels, figure_title(script, env, settings, records), plot_path)


def _list_cases(script: Script, args: argparse.Namespace, groups: list[list[Case]]) -> None:
    cases = [case for group in groups for case in group]
    workers = len({case.impl for case in cases})
    print(
        f"{script.name}: {len(cases)} cases in {workers} worker processes on {args.device}, {args.dtype}, "
        f"hidden {args.hidden}, vocab {args.vocab}, tokens {sorted(set(args.tokens), reverse=True)}, passes "
        f"{args.passes}, in this order:"
    )
    for case in cases:
        print(f"  tokens={case.tokens} impl={case.impl} pass={case.pass_}")


def run_script(script: Script) -> None:
    """Worker mode (the groups of cases on stdin), a listing, a replot, or the whole sweep: tables, JSON
    (rewritten after each case) and plot. Exits 1 when a case ended in ``error``."""
    args = harness.parse_sweep_args(script.description, cpu_tokens=script.cpu_tokens)
    if args.worker:
        harness.run_worker(script.measure, script.metrics)
        return
    if args.replot:
        saved = json.loads(args.replot.read_text())
        plot_path = args.plot or args.replot.with_suffix(".png")  # beside the JSON, which is only read
        print_and_plot(script, saved["environment"], saved["settings"], saved["records"], plot_path)
        print(f"\nwrote {plot_path.resolve()}")
        return
    groups = harness.sweep_groups(args)
    if args.list_cases:
        _list_cases(script, args, groups)
        return
    env = harness.environment(args.device)
    settings = harness.sweep_settings(args)
    json_path, plot_path = harness.output_paths(args, script.name, harness.device_tag(env))
    total = sum(map(len, groups))
    print(
        f"{script.name}: {args.device} {args.dtype}, hidden {args.hidden}, vocab {args.vocab}, "
        f"tokens {sorted(set(args.tokens), reverse=True)}, passes {args.passes}; {total} cases, results in "
        f"{json_path.resolve()}"
    )
    records = []
    for record in harness.run_groups(script.path, groups, script.metrics):
        records.append(record)
        print(
            f"[{len(records)}/{total}] {record['impl']:<20} tokens={record['tokens']:<6} "
            f"{record['pass']:<7} {script.describe(record)}",
            flush=True,
        )
        harness.write_results(json_path, env, settings, records, complete=False)
    harness.write_results(json_path, env, settings, records, complete=True)
    print_and_plot(script, env, settings, records, plot_path)
    print(f"\nwrote {json_path.resolve()}\n  and {plot_path.resolve()}")
    errors = [r for r in records if r["status"] == "error"]
    if errors:
        sys.exit(f"{len(errors)} case(s) failed with an error (see the notes in {json_path})")
