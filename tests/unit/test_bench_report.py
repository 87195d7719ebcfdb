"""The benchmark's verdicts (`bench.report`), on made-up runs: min / median / max per figure,
each target judged met or MISSED in the direction its figure improves (an absolute bound, or a
multiple of a peer's median from the same run), the verdict written next to the figure in
``latest.md``, and a `--quick` run's figures more than 20 % worse than the baseline reported, as
measured and once the machine's speed (how fast the peers ran against their own baseline
figures) is divided out."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


def _document(runs: report.Runs, agg: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A results document as `bench.run` writes it, for ``runs`` and their aggregate."""
    return {
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
        **fields,
    }


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
    document = _document(runs, agg, regressions=[])
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


def _everywhere(values: dict[str, float], scale: float) -> dict[str, list[float]]:
    """Every figure of ``values`` as a machine ``scale`` times as fast would measure it."""
    out = {}
    for key, value in values.items():
        wkey, name = key.split("/")
        better = report.figure(wkey, name).better
        out[key] = [value * scale if better == "higher" else value / scale]
    return out


_PEERS = {
    "floor": {"w1/start_one_by_one": 3_000.0, "w2/activity_throughput": 4_000.0},
    "pgqueuer": {
        "w1/start_one_by_one": 2_500.0,
        "w2/activity_throughput": 2_000.0,
        "w4/latency_p50_ms": 2.0,
        "w4/latency_p99_ms": 3.0,
    },
    "procrastinate": {"w2/activity_throughput": 700.0, "w4/latency_p50_ms": 2.0},
    "dbos": {"w1/start_one_by_one": 1_000.0, "w3/workflow_throughput": 80.0},
}
_OURS = {
    "w1/start_one_by_one": 500.0,
    "w2/activity_throughput": 1_500.0,
    "w3/workflow_throughput": 240.0,
    "w4/latency_p50_ms": 4.0,
    "w5/cancel_p99_ms": 10.0,
}


def test_the_machine_speed_is_how_fast_the_peers_ran_against_their_baseline() -> None:
    baseline = report.aggregate(_runs(**{s: _everywhere(f, 1.0) for s, f in _PEERS.items()}))
    now = report.aggregate(
        _runs(
            floor=_everywhere(_PEERS["floor"], 0.5),
            pgqueuer=_everywhere(_PEERS["pgqueuer"], 0.5),
            procrastinate=_everywhere(_PEERS["procrastinate"], 0.5),
            dbos={"w1/start_one_by_one": [500.0], "w3/workflow_throughput": [20.0]},  # 1/2, 1/4
            everruns={"w3/workflow_throughput": [1.0]},  # never part of the machine's speed
        )
    )
    speeds = report.machine_speeds(now, baseline)
    assert speeds["w1"] == pytest.approx(0.5)
    assert speeds["w2"] == pytest.approx(0.5)
    assert speeds["w4"] == pytest.approx(0.5)  # latencies twice as long: half the speed
    assert speeds["all"] == pytest.approx(0.5)  # the median of nine halves and a quarter
    assert "w3" not in speeds  # one peer figure: too few to speak for the machine
    assert "w5" not in speeds  # no peer runs it
    assert report.machine_speeds(now, {}) == {}


def test_a_workload_with_one_peer_figure_is_judged_at_the_whole_runs_speed() -> None:
    """DBOS's one w3 figure did not move while every other peer ran at half speed: w3 is
    held to the whole run's half speed, so everruns' w3 at half its baseline is no
    regression (held to DBOS's figure alone, it would be one)."""
    baseline = report.aggregate(
        _runs(
            everruns={"w3/workflow_throughput": [200.0]},
            **{s: _everywhere(f, 1.0) for s, f in _PEERS.items()},
        )
    )
    peers = {s: _everywhere(f, 0.5) for s, f in _PEERS.items()}
    peers["dbos"]["w3/workflow_throughput"] = [80.0]
    now = report.aggregate(_runs(everruns={"w3/workflow_throughput": [100.0]}, **peers))
    assert report.adjusted_regressions(now, baseline) == []


def test_a_peer_figure_a_timer_bounds_does_not_pass_for_the_machine() -> None:
    """DBOS's w4 latency is its queue's one-second poll on any machine: with both peers'
    latencies twice as long, the machine is half as fast, whatever DBOS's figure says."""
    peers = {
        "pgqueuer": {"w4/latency_p50_ms": 2.0, "w4/latency_p99_ms": 3.0},
        "procrastinate": {"w4/latency_p50_ms": 2.0, "w4/latency_p99_ms": 3.0},
        "dbos": {"w4/latency_p50_ms": 1_000.0},
    }
    baseline = report.aggregate(_runs(**{s: _everywhere(f, 1.0) for s, f in peers.items()}))
    slower = {s: _everywhere(f, 0.5) for s, f in peers.items() if s != "dbos"}
    now = report.aggregate(_runs(dbos={"w4/latency_p50_ms": [1_000.0]}, **slower))
    assert report.machine_speeds(now, baseline)["w4"] == pytest.approx(0.5)


def test_on_a_slower_machine_only_what_lost_more_than_the_peers_is_a_regression() -> None:
    baseline = report.aggregate(
        _runs(
            everruns=_everywhere(_OURS, 1.0), **{s: _everywhere(f, 1.0) for s, f in _PEERS.items()}
        )
    )
    ours = _everywhere(_OURS, 0.5)
    ours["w1/start_one_by_one"] = [150.0]  # 0.3 x: 40 % worse than the peers' 0.5 x
    ours["w5/cancel_p99_ms"] = [30.0]  # no peer: held to the whole run's 0.5 x, 50 % worse
    now = report.aggregate(
        _runs(everruns=ours, **{s: _everywhere(f, 0.5) for s, f in _PEERS.items()})
    )
    # As measured, everything is worse; at the baseline machine's speed, two figures are.
    assert len(report.regressions(now, baseline)) == 5 + 10
    assert report.adjusted_regressions(now, baseline) == [
        "w1 everruns start_one_by_one: 150, 300 at the baseline machine's speed (the peers "
        "ran 0.50 x as fast as in it), vs baseline 500 (-40 %)",
        "w5 everruns cancel_p99_ms: 30.0, 15.0 at the baseline machine's speed (the peers "
        "ran 0.50 x as fast as in it), vs baseline 10.0 (+50 %)",
    ]


def test_memory_and_an_offered_load_are_compared_as_measured() -> None:
    baseline = report.aggregate(
        _runs(
            everruns={"w7/server_rss_mb": [100.0], "w7/achieved_activities_per_s": [100.0]},
            dbos={"w3/workflow_throughput": [80.0]},
        )
    )
    # A machine twice as fast does not make memory half as big or the offered load double.
    now = report.aggregate(
        _runs(
            everruns={"w7/server_rss_mb": [130.0], "w7/achieved_activities_per_s": [99.0]},
            dbos={"w3/workflow_throughput": [160.0]},
        )
    )
    assert report.adjusted_regressions(now, baseline) == [
        "w7 everruns server_rss_mb: 130, not adjusted, vs baseline 100 (+30 %)"
    ]


def test_with_no_peer_figure_to_compare_figures_are_taken_as_measured() -> None:
    baseline = report.aggregate(_runs(everruns={"w5/cancel_p99_ms": [10.0]}))
    now = report.aggregate(_runs(everruns={"w5/cancel_p99_ms": [13.0]}))
    assert report.adjusted_regressions(now, baseline) == [
        "w5 everruns cancel_p99_ms: 13.0, not adjusted, vs baseline 10.0 (+30 %)"
    ]
    assert report.adjusted_regressions(baseline, baseline) == []


@given(scale=st.floats(0.05, 20.0), noise=st.floats(-0.15, 0.15))
def test_a_machine_of_any_speed_alone_makes_no_regression(scale: float, noise: float) -> None:
    everything = {"everruns": _OURS, **_PEERS}
    baseline = report.aggregate(_runs(**{s: _everywhere(f, 1.0) for s, f in everything.items()}))
    now = report.aggregate(
        _runs(
            everruns=_everywhere(_OURS, scale * (1 + noise)),
            **{s: _everywhere(f, scale) for s, f in _PEERS.items()},
        )
    )
    assert report.machine_speeds(now, baseline)["all"] == pytest.approx(scale)
    assert report.adjusted_regressions(now, baseline) == []


def test_the_markdown_says_how_fast_the_machine_ran_and_what_lost_more() -> None:
    baseline = report.aggregate(_runs(dbos={"w3/workflow_throughput": [80.0]}))
    agg = report.aggregate(
        _runs(everruns={"w3/workflow_throughput": [100.0]}, dbos={"w3/workflow_throughput": [40.0]})
    )
    document = _document(
        {},
        agg,
        regressions=["w3 dbos workflow_throughput: 40.0 vs baseline 80.0 (-50 %)"],
        machine_speed=report.machine_speeds(agg, baseline),
        adjusted_regressions=["w3 everruns workflow_throughput: (a line)"],
    )
    text = report.markdown(document)
    assert (
        "The peers and the floor ran 0.50 x as fast as in the baseline's run. "
        "Everruns' figures brought to the baseline machine's speed, more than 20 % worse:\n\n"
        "- w3 everruns workflow_throughput: (a line)\n"
    ) in text
