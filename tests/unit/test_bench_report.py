"""The benchmark's verdicts (`bench.report`), on made-up runs: min / median / max per figure,
each target judged met or MISSED in the direction its figure improves (an absolute bound, or a
multiple of a peer's median from the same run), the verdict written next to the figure in
``latest.md``, and a `--quick` run's figures more than 20 % worse than the baseline reported."""

from __future__ import annotations

from typing import Any

from bench import report


def _runs(**figures: dict[str, list[float]]) -> report.Runs:
    """``system={"wN/figure": [rep1, rep2...]}`` as the suite's per-repetition runs."""
    runs: report.Runs = {}
    for system, by_figure in figures.items():
        for key, values in by_figure.items():
            wkey, name = key.split("/")
            reps = runs.setdefault(wkey, {}).setdefault(system, [])
            while len(reps) < len(values):
                reps.append({"figures": {}, "notes": []})
            for rep, value in zip(reps, values, strict=False):
                rep["figures"][name] = value
    return runs


def _verdict(verdicts: list[dict[str, Any]], workload: str, target: str) -> dict[str, Any]:
    (found,) = [v for v in verdicts if v["workload"] == workload and v["target"] == target]
    return found


def test_each_figure_is_summarized_over_its_repetitions() -> None:
    agg = report.aggregate(_runs(everruns={"w3/workflow_throughput": [250.0, 240.0, 270.0]}))
    assert agg["w3"]["everruns"]["workflow_throughput"] == {
        "min": 240.0,
        "median": 250.0,
        "max": 270.0,
        "n": 3.0,
    }
    assert report.summarize([float("nan"), float("inf")]) is None


def test_targets_are_judged_in_the_direction_each_figure_improves() -> None:
    agg = report.aggregate(
        _runs(
            everruns={
                "w1/start_batch": [21_000.0],  # higher is better, absolute bound 20,000
                "w3/workflow_throughput": [250.0],  # 3 x DBOS's
                "w4/latency_p50_ms": [5.0],  # lower is better, PgQueuer's p50
                "w4/latency_p99_ms": [9.0],  # lower is better, 10 ms
            },
            dbos={"w3/workflow_throughput": [100.0]},
            pgqueuer={"w4/latency_p50_ms": [2.0]},
        )
    )
    verdicts = report.judge(agg)
    batch = _verdict(verdicts, "w1", ">= 20,000 starts/s")
    assert (batch["status"], batch["bound"]) == ("met", 20_000.0)
    three = _verdict(verdicts, "w3", ">= 3 x DBOS")
    assert (three["status"], three["bound"]) == ("MISSED", 300.0)
    p50 = _verdict(verdicts, "w4", "<= PgQueuer's p50")
    assert (p50["status"], p50["bound"], p50["ratio_to_bound"]) == ("MISSED", 2.0, 2.5)
    assert _verdict(verdicts, "w4", "<= 10 ms")["status"] == "met"
    # No figure, or no peer figure to hold it to: unknown, never met.
    assert _verdict(verdicts, "w1", ">= 1.0 x DBOS")["status"] == "unknown"
    assert _verdict(verdicts, "w2", ">= 0.4 x floor")["status"] == "unknown"


def test_a_missed_target_is_written_next_to_its_figure() -> None:
    runs = _runs(
        everruns={"w3/workflow_throughput": [250.0, 240.0]},
        dbos={"w3/workflow_throughput": [100.0, 100.0]},
    )
    agg = report.aggregate(runs)
    document = {
        "mode": "quick",
        "started_at": "2026-11-26T00:00:00+00:00",
        "duration_s": 60.0,
        "repetitions": 2,
        "environment": {
            "commit": "abc1234",
            "cores": 2,
            "memory_gb": 24.0,
            "platform": "Linux",
            "python": "3.11",
            "postgres": {"version": "18", "where": "embedded", "settings": {"fsync": "on"}},
            "versions": {"everruns": "0.1.0"},
        },
        "runs": runs,
        "aggregate": agg,
        "ratios": report.ratios(agg),
        "targets": report.judge(agg),
        "regressions": [],
    }
    (row,) = [
        line
        for line in report.markdown(document).splitlines()
        if line.startswith("| workflow throughput")
    ]
    assert "**245** (240-250)" in row and "x2.45" in row
    assert row.endswith("| >= 3 x DBOS: **MISSED** (245 vs 300) |")
    assert "## Compared with baseline.json (more than 20 % worse)\n\n- none" in report.markdown(
        document
    )


def test_figures_more_than_20_percent_worse_than_the_baseline_are_reported() -> None:
    baseline = report.aggregate(
        _runs(
            everruns={
                "w2/activity_throughput": [2_000.0],
                "w3/workflow_throughput": [250.0],
                "w4/latency_p50_ms": [5.0],
                "w4/latency_p99_ms": [7.0],
            }
        )
    )
    now = report.aggregate(
        _runs(
            everruns={
                "w2/activity_throughput": [1_500.0],  # 25 % fewer: worse
                "w3/workflow_throughput": [210.0],  # 16 % fewer: within the noise allowed
                "w4/latency_p50_ms": [6.5],  # 30 % slower: worse
                "w4/latency_p99_ms": [5.0],  # faster: better, not reported
                "w5/cancel_p99_ms": [9.0],  # no baseline figure: nothing to compare
            }
        )
    )
    lines = report.regressions(now, baseline)
    assert lines == [
        "w2 everruns activity_throughput: 1,500 vs baseline 2,000 (-25 %)",
        "w4 everruns latency_p50_ms: 6.50 vs baseline 5.00 (+30 %)",
    ]
    assert report.regressions(baseline, baseline) == []
