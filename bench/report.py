"""Turns the runs of one suite invocation into the results files, and judges them.

Input: every run's figures (per workload, system and repetition), the environment, failures.
Output: ``latest.json`` (everything, machine-readable), ``latest.md`` (the table docs show),
the verdict on each target of issue 6, and the comparison with ``baseline.json``. Pure
functions over plain data, apart from the writers at the end.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.workloads import BY_KEY, SYSTEMS, TARGETS, WORKLOADS, figure

Runs = dict[str, dict[str, list[dict[str, Any]]]]
"""workload -> system -> one entry per repetition: {"figures": {...}, "notes": [...]} or
{"error": "..."}."""

REGRESSION = 0.20
MIN_PEER_FIGURES = 3
"""Peer figures a workload needs to have a machine speed of its own (`machine_speeds`)."""


def summarize(values: Sequence[float]) -> dict[str, float] | None:
    """min / median / max of the finite values, with how many there were."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    return {
        "min": min(finite),
        "median": statistics.median(finite),
        "max": max(finite),
        "n": float(len(finite)),
    }


def aggregate(runs: Runs) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """workload -> system -> figure -> summary, over the repetitions that produced it."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for wkey, by_system in runs.items():
        for system, reps in by_system.items():
            names = {n for r in reps for n in r.get("figures", {})}
            for name in sorted(names):
                summary = summarize(
                    [r["figures"][name] for r in reps if name in r.get("figures", {})]
                )
                if summary is not None:
                    out.setdefault(wkey, {}).setdefault(system, {})[name] = summary
    return out


def median_of(agg: Mapping[str, Any], wkey: str, system: str, name: str) -> float | None:
    try:
        value: float = agg[wkey][system][name]["median"]
    except KeyError:
        return None
    return value


def judge(agg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every target with the everruns median, the bound it was held to, and met/MISSED/unknown.

    ``by`` says how far off: the everruns figure divided by the bound, so 0.25 means a
    higher-is-better figure reached a quarter of its bound, and 4.0 means a lower-is-better
    figure is four times its bound.
    """
    verdicts = []
    for target in TARGETS:
        fig = figure(target.workload, target.figure)
        ours = median_of(agg, target.workload, "everruns", target.figure)
        bound: float | None = target.value
        if target.peer is not None:
            peer = median_of(agg, target.workload, target.peer, target.figure)
            bound = None if peer is None else peer * target.value
        if ours is None or bound is None:
            status, by = "unknown", None
        else:
            met = ours >= bound if fig.better == "higher" else ours <= bound
            status = "met" if met else "MISSED"
            by = ours / bound if bound else None
        verdicts.append(
            {
                "workload": target.workload,
                "figure": target.figure,
                "target": target.text,
                "everruns": ours,
                "bound": bound,
                "status": status,
                "ratio_to_bound": by,
            }
        )
    return verdicts


def ratios(agg: Mapping[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """workload -> figure -> peer -> everruns median / peer median."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for wkey, by_system in agg.items():
        ours = by_system.get("everruns", {})
        for name, summary in ours.items():
            for system, figures in by_system.items():
                if system == "everruns" or name not in figures:
                    continue
                theirs = figures[name]["median"]
                if theirs:
                    out.setdefault(wkey, {}).setdefault(name, {})[system] = (
                        summary["median"] / theirs
                    )
    return out


def regressions(
    agg: Mapping[str, Any], baseline: Mapping[str, Any], threshold: float = REGRESSION
) -> list[str]:
    """Lines for every figure whose median is more than ``threshold`` worse than the baseline."""
    lines = []
    for wkey, by_system in agg.items():
        for system, figures in by_system.items():
            for name, summary in figures.items():
                old = median_of(baseline, wkey, system, name)
                if old is None or not old:
                    continue
                new = summary["median"]
                if _worse(wkey, name, new, old, threshold):
                    lines.append(
                        f"{wkey} {system} {name}: {_num(new)} vs baseline {_num(old)} "
                        f"({_change(new, old)})"
                    )
    return lines


def _worse(wkey: str, name: str, new: float, old: float, threshold: float) -> bool:
    """Whether ``new`` is more than ``threshold`` worse than ``old``, in the figure's sense."""
    if figure(wkey, name).better == "higher":
        return new < old * (1 - threshold)
    return new > old * (1 + threshold)


def _change(new: float, old: float) -> str:
    return f"{(new - old) / old * 100.0:+.0f} %"


def _speedup(wkey: str, name: str, new: float, old: float) -> float | None:
    """``new`` against ``old`` as a speed: above 1 when the figure improved."""
    if not (new > 0 and old > 0):
        return None
    return new / old if figure(wkey, name).better == "higher" else old / new


def machine_speeds(agg: Mapping[str, Any], baseline: Mapping[str, Any]) -> dict[str, float]:
    """How much faster the peers and the floor ran than in the baseline's run.

    workload -> the median of the speed-ups (`_speedup`) of their machine-bound figures in
    that workload, for a workload with at least `MIN_PEER_FIGURES` of them, and ``"all"`` ->
    the same over every workload. Empty when no such figure is in both runs. Everruns'
    figures are left out: they are what is being judged. The median, not a mean: a peer
    figure bound by a timer rather than the machine (DBOS's w4 latency is its queue's
    one-second poll) stays where it was on any machine, and a mean would take it for a
    machine as fast as the baseline's. A workload with fewer figures (w3: DBOS's one) would
    hand one figure's noise to everruns' adjusted figure; it takes the whole run's speed.
    """
    speedups: dict[str, list[float]] = {}
    for wkey, by_system in agg.items():
        for system, figures in by_system.items():
            if system == "everruns":
                continue
            for name, summary in figures.items():
                old = median_of(baseline, wkey, system, name)
                if old is None or not figure(wkey, name).machine_bound:
                    continue
                speedup = _speedup(wkey, name, summary["median"], old)
                if speedup is not None:
                    speedups.setdefault(wkey, []).append(speedup)
                    speedups.setdefault("all", []).append(speedup)
    return {
        key: statistics.median(values)
        for key, values in speedups.items()
        if key == "all" or len(values) >= MIN_PEER_FIGURES
    }


def adjusted_regressions(
    agg: Mapping[str, Any], baseline: Mapping[str, Any], threshold: float = REGRESSION
) -> list[str]:
    """Lines for every everruns figure more than ``threshold`` worse than the baseline once
    the machine's speed is divided out.

    A machine-bound figure is first brought to the baseline machine's speed: divided by the
    peers' speed-up in the same workload (`machine_speeds`) if it is a rate, multiplied by it
    if it is a time; where no peer ran that workload (w5-w7), or too few of their figures are
    in it (w3), by their speed-up over the whole run. A figure the machine does not bound
    (memory, an offered load), or one with no peer figure to compare, is taken as it is.
    """
    speeds = machine_speeds(agg, baseline)
    lines = []
    for wkey, by_system in agg.items():
        for name, summary in by_system.get("everruns", {}).items():
            old = median_of(baseline, wkey, "everruns", name)
            new = summary["median"]
            if old is None or not old:
                continue
            fig = figure(wkey, name)
            machine = speeds.get(wkey, speeds.get("all")) if fig.machine_bound else None
            adjusted = new
            if machine is not None:
                adjusted = new / machine if fig.better == "higher" else new * machine
            if _worse(wkey, name, adjusted, old, threshold):
                how = (
                    f"{_num(adjusted)} at the baseline machine's speed (the peers ran "
                    f"{machine:.2f} x as fast as in it)"
                    if machine is not None
                    else "not adjusted"
                )
                lines.append(
                    f"{wkey} everruns {name}: {_num(new)}, {how}, vs baseline {_num(old)} "
                    f"({_change(adjusted, old)})"
                )
    return lines


# ------------------------------------------------------------------------------ markdown


def _num(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _cell(summary: Mapping[str, float] | None) -> str:
    if summary is None:
        return "-"
    if summary["n"] <= 1:
        return f"**{_num(summary['median'])}**"
    return f"**{_num(summary['median'])}** ({_num(summary['min'])}-{_num(summary['max'])})"


def _grouped_notes(per_run: Sequence[Sequence[str]]) -> list[str]:
    """Notes that differ only in their numbers shown once, with how many runs had them."""
    groups: dict[str, list[str]] = {}
    for notes in per_run:
        for note in notes:
            groups.setdefault(re.sub(r"\d[\d.,]*", "#", note), []).append(note)
    shown = []
    for examples in groups.values():
        suffix = ""
        if len(per_run) > 1:
            suffix = f" (in {len(examples)} of {len(per_run)} runs"
            suffix += "; numbers of the first)" if len(set(examples)) > 1 else ")"
        shown.append(examples[0] + suffix)
    return shown


def markdown(document: Mapping[str, Any]) -> str:
    """The human-readable results: environment, one table per workload, targets, notes."""
    env = document["environment"]
    agg = document["aggregate"]
    runs: Runs = document["runs"]
    verdicts = document["targets"]
    lines = [
        f"# Benchmark results ({document['mode']} run)",
        "",
        f"- when: {document['started_at']} (took {document['duration_s']:.0f} s), "
        f"commit {env.get('commit', '?')}",
        f"- machine: {env['cores']} cores, {env['memory_gb']:.1f} GB memory, "
        f"{env['platform']}, Python {env['python']}",
        f"- PostgreSQL {env['postgres']['version']} ({env['postgres']['where']}): "
        + ", ".join(f"{k}={v}" for k, v in env["postgres"]["settings"].items()),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()),
        f"- repetitions per workload: {document['repetitions']}; cells are **median** "
        "(min-max); ratio = everruns median / peer median",
        "",
    ]
    by_target: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for v in verdicts:
        by_target.setdefault((v["workload"], v["figure"]), []).append(v)
    for workload in WORKLOADS:
        if workload.key not in runs:
            continue
        systems = [s for s in SYSTEMS if s in runs[workload.key]]
        lines.append(f"## {workload.key}: {workload.title}")
        lines.append("")
        header = ["figure", *systems, "target"]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for fig in workload.figures:
            row = [f"{fig.label} ({fig.unit})"]
            for system in systems:
                cell = _cell(agg.get(workload.key, {}).get(system, {}).get(fig.name))
                if system != "everruns":
                    ratio = document["ratios"].get(workload.key, {}).get(fig.name, {}).get(system)
                    if ratio is not None:
                        cell += f" x{_num(ratio)}"
                row.append(cell)
            verdict = "; ".join(
                f"{v['target']}: **{v['status']}**"
                + (
                    f" ({_num(v['everruns'])} vs {_num(v['bound'])})"
                    if v["status"] != "unknown"
                    else ""
                )
                for v in by_target.get((workload.key, fig.name), [])
            )
            row.append(verdict or "")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        for system in SYSTEMS:
            if system in workload.not_applicable:
                lines.append(f"- {system}: not run — {workload.not_applicable[system]}")
        for system in systems:
            reps = runs[workload.key][system]
            errors = [r["error"] for r in reps if "error" in r]
            for note in _grouped_notes([r.get("notes", []) for r in reps]):
                lines.append(f"- {system}: {note}")
            for error in errors:
                lines.append(f"- {system}: FAILED — {error}")
        lines.append("")
    lines.append("## Targets")
    lines.append("")
    lines.append("| workload | figure | target | everruns | bound | status |")
    lines.append("|---|---|---|---|---|---|")
    for v in verdicts:
        lines.append(
            f"| {v['workload']} | {v['figure']} | {v['target']} | {_num(v['everruns'])} | "
            f"{_num(v['bound'])} | **{v['status']}** |"
        )
    lines.append("")
    if document.get("regressions") is not None:
        lines.append("## Compared with baseline.json (more than 20 % worse)")
        lines.append("")
        lines.extend(f"- {r}" for r in document["regressions"] or ["none"])
        lines.append("")
        speeds = document.get("machine_speed")
        if speeds and document.get("adjusted_regressions") is not None:
            per = ", ".join(f"{k} {v:.2f}" for k, v in sorted(speeds.items()) if k != "all")
            lines.append(
                f"The peers and the floor ran {speeds['all']:.2f} x as fast as in the baseline's "
                "run" + (f" ({per})" if per else "") + ". Everruns' figures brought to the "
                "baseline machine's speed, more than 20 % worse:"
            )
            lines.append("")
            lines.extend(f"- {r}" for r in document["adjusted_regressions"] or ["none"])
            lines.append("")
    for skipped in document.get("skipped", []):
        lines.append(f"- skipped: {skipped}")
    return "\n".join(lines).rstrip() + "\n"


DOCS_START = "<!-- bench:latest:start -->"
DOCS_END = "<!-- bench:latest:end -->"


def update_docs(document: Mapping[str, Any], docs: Path) -> bool:
    """Put this run's tables between the markers of ``docs`` (headings moved two levels down).

    Returns:
        False when the file or its markers are missing (nothing is written then).
    """
    try:
        text = docs.read_text()
    except OSError:
        return False
    start, end = text.find(DOCS_START), text.find(DOCS_END)
    if start < 0 or end < start:
        return False
    body = "\n".join(
        "##" + line if line.startswith("#") else line
        for line in markdown(document).splitlines()[1:]
    ).strip()
    docs.write_text(text[: start + len(DOCS_START)] + "\n" + body + "\n" + text[end:])
    return True


def write(document: Mapping[str, Any], json_path: Path, md_path: Path) -> None:
    json_path.write_text(
        json.dumps(document, indent=1, sort_keys=False, allow_nan=False, default=_json_default)
    )
    md_path.write_text(markdown(document))


def _json_default(value: object) -> object:
    return str(value)


def workload_keys() -> list[str]:
    return list(BY_KEY)
