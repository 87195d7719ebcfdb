"""The senders' side of the control plane's message limit, without I/O: batches cut in order into
calls under the budget (nothing lost, an item over it alone), the size bounds at least what
protobuf encodes, the worker's batcher keeping to its byte budget, and a refusal for size that
the worker does not retry."""

from __future__ import annotations

import itertools
from typing import Any, cast

import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from everruns._proto.everruns import v1 as pb
from everruns.domain.budget import ENVELOPE_BYTES, field_bytes, split, take, within
from everruns.errors import ResourceExhausted
from everruns.worker import runtime
from everruns.worker.batch import Batcher

sizes_ = st.lists(st.integers(min_value=0, max_value=5000), max_size=60)


@given(sizes_, st.integers(min_value=1, max_value=8000), st.integers(min_value=1, max_value=10))
def test_split_keeps_order_loses_nothing_and_stays_under_the_budget(
    sizes: list[int], budget: int, max_items: int
) -> None:
    chunks = split(sizes, budget=budget, max_items=max_items)
    assert [i for chunk in chunks for i in chunk] == list(range(len(sizes)))
    for chunk in chunks:
        assert 1 <= len(chunk) <= max_items
        assert len(chunk) == 1 or sum(sizes[i] for i in chunk) <= budget
    # Greedy: a call that could have taken the next item took it.
    for chunk, after in itertools.pairwise(chunks):
        fuller = sum(sizes[i] for i in chunk) + sizes[after.start]
        assert len(chunk) == max_items or fuller > budget


def test_take_sends_one_item_alone_whatever_its_size() -> None:
    assert take([10**9, 1], budget=100, max_items=10) == 1
    assert take([1, 10**9], budget=100, max_items=10) == 1
    assert take([], budget=100, max_items=10) == 0
    assert take([40, 60, 1], budget=100, max_items=10) == 2


@given(st.integers(min_value=0, max_value=3 * 2**20))
def test_field_bytes_bounds_what_protobuf_encodes(length: int) -> None:
    encoded = bytes(pb.ActivityResult(result=b"x" * length))
    assert len(encoded) <= field_bytes(length)


def test_within_leaves_room_for_the_envelope_and_an_unknown_limit_is_no_limit() -> None:
    assert within(10**12, 0)
    assert within(1000, 1000 + ENVELOPE_BYTES)
    assert not within(1001, 1000 + ENVELOPE_BYTES)


texts = st.text(max_size=40)


@given(
    st.binary(max_size=3000),
    texts,
    texts,
    st.lists(st.tuples(texts, st.uuids().map(str)), max_size=5),
    st.integers(min_value=0, max_value=2**63 - 1),
)
def test_a_decision_s_bound_is_at_least_its_encoded_size(
    commands: bytes, task_id: str, worker_id: str, started: list[tuple[str, str]], big: int
) -> None:
    request = pb.CompleteWorkflowTaskRequest(
        task_id=task_id,
        lease_token=big,
        worker_id=worker_id,
        seen_sequence=big,
        commands=commands,
        claim_time=1e18,
        max_eager_tasks=2**31 - 1,
        started=[pb.StartedActivity(activity_id=a, task_id=t) for a, t in started],
    )
    batch = pb.CompleteWorkflowTasksRequest(completions=[request, request])
    assert len(bytes(batch)) <= 2 * runtime._request_bytes(request)
    assert runtime._request_bytes(request) <= runtime._decision_bytes(
        task_id, worker_id, commands, (a for a, _ in started)
    )


@given(st.binary(max_size=3000), st.binary(max_size=3000), texts, texts)
async def test_a_result_s_bound_is_at_least_its_encoded_size(
    result: bytes, commands: bytes, run_id: str, activity_id: str
) -> None:
    task = pb.Task(task_id="t" * 36, run_id=run_id, activity_id=activity_id)
    handle = runtime._RunningTask(task, cast(Any, None))
    handle.outcome = runtime._Completed(result)
    handle.ahead = runtime._Ahead(cast(Any, None), cast(Any, None), cast(Any, None), commands)
    request = pb.CompleteActivityTasksRequest(
        results=[pb.ActivityResult(task_id=task.task_id, lease_token=2**62, result=result)],
        decisions=[
            pb.FollowUpDecision(
                result=2**31 - 1,
                run_id=run_id,
                activity_id=activity_id,
                after_sequence=2**62,
                after_time=1e18,
                seen_sequence=2**62,
                commands=commands,
                decided_at=1e18,
            )
        ],
    )
    assert len(bytes(request)) <= runtime._result_bytes(handle)


async def test_the_batcher_keeps_each_call_within_its_byte_budget() -> None:
    calls: list[list[int]] = []
    gate = trio.Event()

    async def send(items: list[int]) -> list[int]:
        calls.append(items)
        await gate.wait()
        return items

    batcher: Batcher[int, int] = Batcher(send, max_batch=100, size=lambda n: n)
    batcher.max_bytes = 100
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            nursery.start_soon(batcher.submit, 1)  # in flight while the others gather
            await trio.testing.wait_all_tasks_blocked()
            for n in (60, 30, 20, 500, 5, 100):
                nursery.start_soon(batcher.submit, n)
                await trio.testing.wait_all_tasks_blocked()
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert calls == [[1], [60, 30], [20], [500], [5], [100]]


def test_a_refusal_for_the_message_limit_is_not_retried() -> None:
    over = ResourceExhausted(
        "CompleteActivityTasks request of 99999999 bytes is over the control plane's limit of "
        "67108864 bytes (EVERRUNS_MAX_MESSAGE_BYTES)"
    )
    assert not runtime.is_transient(over)
    assert runtime.is_transient(ResourceExhausted("too many pending tasks"))
