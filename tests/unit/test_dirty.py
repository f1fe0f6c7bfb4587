"""The dirty bitmap against a set-of-chunks model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.block.dirty import DirtyBitmap

G = 4096


def model_runs(chunks: set[int], size: int, max_length: int) -> list[tuple[int, int]]:
    runs = []
    offset = 0
    limit = max(1, max_length // G)
    while True:
        ahead = sorted(c for c in chunks if c * G >= offset)
        if not ahead:
            return runs
        first = ahead[0]
        last = first
        while last + 1 in chunks and last + 1 - first < limit:
            last += 1
        start = first * G
        end = min((last + 1) * G, size)
        runs.append((start, end - start))
        offset = end


def bitmap_runs(bitmap: DirtyBitmap, max_length: int) -> list[tuple[int, int]]:
    runs = []
    offset = 0
    while (run := bitmap.next_run(offset, max_length)) is not None:
        runs.append(run)
        offset = run[0] + run[1]
    return runs


ops = st.lists(
    st.tuples(st.booleans(), st.integers(0, 300 * G), st.integers(1, 80 * G)), max_size=30
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 200 * G), operations=ops, max_length=st.integers(1, 40 * G))
def test_matches_a_model(size: int, operations: list[tuple[bool, int, int]], max_length: int):
    bitmap = DirtyBitmap(size, G)
    chunks: set[int] = set()
    for dirty, offset, length in operations:
        end = min(offset + length, size)
        touched = set(range(offset // G, -(-end // G))) if offset < end else set()
        if dirty:
            bitmap.mark(offset, length)
            chunks |= touched
        else:
            bitmap.clear(offset, length)
            chunks -= touched
        expected = sum(min((c + 1) * G, size) - c * G for c in chunks)
        assert bitmap.dirty_bytes == expected
        assert bool(bitmap) == bool(chunks)
    assert bitmap_runs(bitmap, max_length) == model_runs(chunks, size, max_length)


def test_whole_disk_and_edges():
    bitmap = DirtyBitmap(10 * G + 100, G)
    bitmap.mark(0, 1 << 40)
    assert bitmap.dirty_bytes == 10 * G + 100
    assert bitmap.next_run(0, 1 << 30) == (0, 10 * G + 100)
    assert bitmap.next_run(3 * G + 1, 2 * G) == (3 * G, 2 * G)
    bitmap.clear(0, 10 * G)
    assert bitmap.next_run(0, G) == (10 * G, 100)
    bitmap.clear(10 * G, 1)
    assert not bitmap
    assert bitmap.next_run(0, G) is None
    bitmap.mark(-5, 10)
    bitmap.mark(20 * G, 5)
    assert not bitmap


def test_granularity_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        DirtyBitmap(1 << 20, 3000)


def test_clear_inside_cleans_only_whole_chunks() -> None:
    bitmap = DirtyBitmap(10 * 4096 + 100, 4096)
    bitmap.mark(0, bitmap.size)
    # [100, 3*4096+50) covers chunks 1 and 2 whole, 0 and 3 in part
    assert bitmap.clear_inside(100, 3 * 4096 - 50) == 2 * 4096
    assert bitmap.runs(0, bitmap.size) == [(0, 4096), (3 * 4096, bitmap.size - 3 * 4096)]
    # the last chunk counts as whole up to the end of the disk
    assert bitmap.clear_inside(10 * 4096, 100) == 100
    assert bitmap.clear_inside(5, 10) == 0  # nothing whole inside
    assert bitmap.runs(4096, 5 * 4096, limit=4096) == [(3 * 4096, 2 * 4096)]
    assert bitmap.runs(3 * 4096 + 10, 4 * 4096) == [(3 * 4096 + 10, 4096 - 10)]
