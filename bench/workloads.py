"""What the benchmark measures: workloads, their sizes, the figures they yield and the targets.

Shared by the driver (`bench.run`), which decides what to run and judges the results, and the
per-system runners (`bench.systems.*`), which read their sizes from here so that every system
gets exactly the same work. Pure data: no I/O, no process handling.
"""

from __future__ import annotations

from typing import Literal

import attrs

SYSTEMS = ("everruns", "floor", "pgqueuer", "procrastinate", "dbos")
"""Every system the suite knows, in the order results are shown."""

Better = Literal["higher", "lower"]


@attrs.frozen
class Figure:
    """One number a workload yields.

    Attributes:
        name: key in the results (``start_one_by_one``).
        label: what a reader sees (``start rate, one by one``).
        unit: ``starts/s``, ``ms``...
        better: whether a higher or a lower value is an improvement.
        machine_bound: whether a faster machine improves it in proportion (rates, latencies,
            CPU share), so that a comparison with another machine's run divides out how much
            faster the peers ran there; memory and an offered load are not.
    """

    name: str
    label: str
    unit: str
    better: Better
    machine_bound: bool = True


@attrs.frozen
class Sizes:
    """How much work one run does, and how long it may take before it is cut short.

    A run that reaches its time cap reports the rate of what it finished (and says so), which
    keeps the whole suite inside its time budget even when a system is slow.
    """

    count: int
    cap_s: float
    batch: int = 0
    extra: int = 0


@attrs.frozen
class Workload:
    """One workload of issue 6.

    Attributes:
        key: ``w1``..``w7``.
        title: short name.
        description: what is done, in one paragraph (also shown in the report).
        figures: what it yields.
        systems: which systems run it; the others are reported as not applicable, with why.
        not_applicable: system -> the reason it does not run this workload.
        full, quick: sizes for a full and a ``--quick`` run.
    """

    key: str
    title: str
    description: str
    figures: tuple[Figure, ...]
    systems: tuple[str, ...]
    not_applicable: dict[str, str]
    full: Sizes
    quick: Sizes

    def sizes(self, quick: bool) -> Sizes:
        return self.quick if quick else self.full


_NO_PEER = "the issue defines no peer figure for this workload"

WORKLOADS: tuple[Workload, ...] = (
    Workload(
        key="w1",
        title="start rate",
        description=(
            "10,000 workflow starts from one client with no worker running: one by one (each "
            "call awaited before the next), then with the batch API in batches of 1,000. "
            "Peers enqueue jobs the same two ways; the floor is a raw INSERT per start and a "
            "1,000-row INSERT per batch."
        ),
        figures=(
            Figure("start_one_by_one", "start rate, one by one", "starts/s", "higher"),
            Figure("start_batch", "start rate, batch API", "starts/s", "higher"),
        ),
        systems=("everruns", "floor", "pgqueuer", "procrastinate", "dbos"),
        not_applicable={},
        full=Sizes(count=10_000, cap_s=5.0, batch=1_000),
        quick=Sizes(count=2_000, cap_s=3.0, batch=1_000),
    ),
    Workload(
        key="w2",
        title="activity throughput",
        description=(
            "10,000 no-op activities already queued (scheduled by 100 workflows of 100 "
            "activities each, by a separate scheduling worker that is stopped before the "
            "measurement) drained by ONE worker process with 10 slots. Rate = executions "
            "between the first and the last body start. Peers: their worker with concurrency "
            "10 draining 10,000 queued jobs; floor: 10 asyncpg connections claiming with "
            "FOR UPDATE SKIP LOCKED and completing, one job per transaction pair."
        ),
        figures=(Figure("activity_throughput", "activity throughput", "activities/s", "higher"),),
        systems=("everruns", "floor", "pgqueuer", "procrastinate"),
        not_applicable={
            "dbos": (
                "DBOS queues are polled (every 1 s by default) and each poll starts at most the "
                "free worker_concurrency slots, so a 10-slot DBOS worker drains about 10 jobs/s "
                "by design; its throughput path (in-process workflows) is measured in w3"
            )
        },
        full=Sizes(count=10_000, cap_s=10.0, extra=100),
        quick=Sizes(count=2_000, cap_s=6.0, extra=20),
    ),
    Workload(
        key="w3",
        title="workflow throughput",
        description=(
            "2,000 workflows of 3 sequential no-op activities, all started before ONE worker "
            "process with 10 slots is launched; rate = workflows whose third activity ran, "
            "between the first activity's start and the last third activity's start. DBOS: "
            "the same workflow of 3 steps, run in-process (DBOS.start_workflow_async) with at "
            "most 10 at a time, which is DBOS's fastest durable path."
        ),
        figures=(Figure("workflow_throughput", "workflow throughput (3 steps)", "wf/s", "higher"),),
        systems=("everruns", "dbos"),
        not_applicable={
            "floor": "a queue has no multi-step workflows",
            "pgqueuer": "PgQueuer has no multi-step workflows",
            "procrastinate": "Procrastinate has no multi-step workflows",
        },
        full=Sizes(count=2_000, cap_s=12.0),
        quick=Sizes(count=400, cap_s=6.0),
    ),
    Workload(
        key="w4",
        title="latency",
        description=(
            "One start at a time with an idle worker: time from `start_workflow` returning "
            "to the first activity's body starting (peers: enqueue returning to the job "
            "function starting). Bodies report their start time over loopback UDP; both "
            "clocks are the machine's wall clock. 5 warm-up starts are not counted. DBOS runs "
            "5 samples (2 in --quick) after 1 warm-up: its queue is polled every second (its "
            "default), so each sample takes up to a second."
        ),
        figures=(
            Figure("latency_p50_ms", "start-to-run latency p50", "ms", "lower"),
            Figure("latency_p99_ms", "start-to-run latency p99", "ms", "lower"),
        ),
        systems=("everruns", "pgqueuer", "procrastinate", "dbos"),
        not_applicable={"floor": "the floor measures throughput only"},
        full=Sizes(count=500, cap_s=10.0, extra=5),
        quick=Sizes(count=100, cap_s=5.0, extra=2),
    ),
    Workload(
        key="w5",
        title="cancel latency",
        description=(
            "A workflow whose activity sleeps until cancelled; once the body reports it runs, "
            "the client cancels the workflow. Figure: cancel request sent -> the activity "
            "sees trio.Cancelled (reported over UDP)."
        ),
        figures=(
            Figure("cancel_p50_ms", "cancel latency p50", "ms", "lower"),
            Figure("cancel_p99_ms", "cancel latency p99", "ms", "lower"),
        ),
        systems=("everruns",),
        not_applicable={s: _NO_PEER for s in ("floor", "pgqueuer", "procrastinate", "dbos")},
        full=Sizes(count=100, cap_s=8.0),
        quick=Sizes(count=20, cap_s=4.0),
    ),
    Workload(
        key="w6",
        title="crash recovery",
        description=(
            "Two workers; a workflow's activity blocks on its first attempt. When its body "
            "reports it runs, the driver kill -9s that worker (and starts a replacement). "
            "Figure: the kill -> the activity's body starting again on another worker."
        ),
        figures=(
            Figure("recovery_p50_s", "crash recovery p50", "s", "lower"),
            Figure("recovery_max_s", "crash recovery max", "s", "lower"),
        ),
        systems=("everruns",),
        not_applicable={s: _NO_PEER for s in ("floor", "pgqueuer", "procrastinate", "dbos")},
        full=Sizes(count=20, cap_s=15.0),
        quick=Sizes(count=5, cap_s=10.0),
    ),
    Workload(
        key="w7",
        title="scale",
        description=(
            "1,000 simulated workers in 4 processes (raw gRPC: each registers, heartbeats "
            "every 10 s and long-polls PollTasks for one activity type, completing what it "
            "claims) while 100 activities/s flow (10 workflows/s of 10 activities, their "
            "workflow tasks run by one real worker). Figures: claim latency (task scheduled "
            "-> claimed task received), control-plane CPU (one core = 100 %) and peak RSS."
        ),
        figures=(
            Figure("claim_p50_ms", "claim latency p50", "ms", "lower"),
            Figure("claim_p99_ms", "claim latency p99", "ms", "lower"),
            Figure(
                "achieved_activities_per_s",
                "activities claimed per second",
                "/s",
                "higher",
                machine_bound=False,
            ),
            Figure("server_cpu_percent", "control-plane CPU", "%", "lower"),
            Figure("server_rss_mb", "control-plane peak RSS", "MB", "lower", machine_bound=False),
        ),
        systems=("everruns",),
        not_applicable={s: _NO_PEER for s in ("floor", "pgqueuer", "procrastinate", "dbos")},
        full=Sizes(count=1_000, cap_s=12.0, extra=100),
        quick=Sizes(count=1_000, cap_s=6.0, extra=100),
    ),
)

BY_KEY = {w.key: w for w in WORKLOADS}


@attrs.frozen
class Target:
    """A target of issue 6 on a median everruns figure.

    ``peer`` None means an absolute bound ``value``; otherwise the bound is ``value`` times the
    peer's median of the same figure (``peer_figure`` when it differs).
    """

    workload: str
    figure: str
    text: str
    value: float
    peer: str | None = None


TARGETS: tuple[Target, ...] = (
    Target("w1", "start_one_by_one", ">= 1.0 x DBOS", 1.0, "dbos"),
    Target("w1", "start_batch", ">= 20,000 starts/s", 20_000.0),
    Target("w2", "activity_throughput", ">= 1.0 x PgQueuer", 1.0, "pgqueuer"),
    Target("w2", "activity_throughput", ">= 0.4 x floor", 0.4, "floor"),
    Target("w3", "workflow_throughput", ">= 3 x DBOS", 3.0, "dbos"),
    Target("w4", "latency_p50_ms", "<= PgQueuer's p50", 1.0, "pgqueuer"),
    Target("w4", "latency_p99_ms", "<= 10 ms", 10.0),
    Target("w5", "cancel_p99_ms", "<= 50 ms", 50.0),
    Target("w6", "recovery_p50_s", "<= 2 s", 2.0),
    Target("w7", "claim_p99_ms", "<= 50 ms", 50.0),
    Target("w7", "server_rss_mb", "<= 512 MB", 512.0),
)


def figure(workload: str, name: str) -> Figure:
    """The `Figure` called ``name`` of ``workload``.

    Raises:
        KeyError: no such figure.
    """
    for f in BY_KEY[workload].figures:
        if f.name == name:
            return f
    raise KeyError(f"{workload}.{name}")
