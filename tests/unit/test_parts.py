"""Cutting a batch into parts that run side by side (pure core): every position lands in
exactly one part, in ascending order within it; one workflow id never spans two parts; the
number of parts and their sizes stay within what the docstring promises."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from everruns.domain.parts import split_keeping_keys

keys = st.lists(st.sampled_from(["", "", "a", "b", "c", "d"]) | st.text(max_size=3), max_size=80)


@given(keys, st.integers(min_value=1, max_value=30))
def test_every_position_once_and_one_key_in_one_part(batch: list[str], size: int) -> None:
    parts = split_keeping_keys(batch, size)
    assert sorted(n for part in parts for n in part) == list(range(len(batch)))
    assert all(part and part == sorted(part) for part in parts)
    assert len(parts) <= -(-len(batch) // size)
    home = {}
    for p, part in enumerate(parts):
        for n in part:
            if batch[n]:
                assert home.setdefault(batch[n], p) == p, f"{batch[n]!r} spans two parts"
    largest = max(Counter(k for k in batch if k).values(), default=1)
    assert all(len(part) <= size + largest - 1 for part in parts)


@given(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=40))
def test_distinct_keys_fill_parts_evenly_up_to_size(count: int, size: int) -> None:
    parts = split_keeping_keys([f"wf-{n}" if n % 3 else "" for n in range(count)], size)
    assert len(parts) == -(-count // size)
    assert all(len(part) <= size for part in parts)
    if parts:
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_a_batch_that_fits_is_one_part_and_an_empty_one_none() -> None:
    assert split_keeping_keys(["a", "", "a"], 3) == [[0, 1, 2]]
    assert split_keeping_keys([], 5) == []
    assert split_keeping_keys(["x"] * 7, 2) == [list(range(7))]


def test_part_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="part size must be at least 1, got 0"):
        split_keeping_keys(["a"], 0)
