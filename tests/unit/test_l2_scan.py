"""The table-at-a-time classification of L2 entries (qcow2/scan.py) agrees with
the entry-by-entry rules it stands in for: tables.classify for what an entry
holds, Mapping.entry_fault (read=True) for what a read calls corrupt."""

from __future__ import annotations

import itertools
from array import array

from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.block.drivers.qcow2.header import Header
from blockd.block.drivers.qcow2.mapping import CODE_STATUS, STATUS, Mapping
from blockd.block.drivers.qcow2.scan import classify as scan_classify
from blockd.block.drivers.qcow2.scan import runs
from blockd.block.drivers.qcow2.tables import classify, zero_table


def mapping(cluster_bits: int, version: int) -> Mapping:
    header = Header(version, 0, 0, cluster_bits, 1 << 40, 0, 0, 0, 0, 0, 0, 0)
    m = Mapping(None, header, None, None, None, 1 << 20)  # type: ignore[arg-type]
    m.l1 = zero_table(1 << 12)
    return m


def entries(cluster_bits: int) -> st.SearchStrategy[int]:
    cs = 1 << cluster_bits
    host = st.integers(1, (1 << 55) // cs - 1).map(lambda c: c * cs)
    odd = st.integers(1, (1 << 47) - 1).map(lambda x: x << 9)  # any offset bits, aligned or not
    flags = st.sampled_from([0, 1 << 63, 1, (1 << 63) | 1])
    return st.one_of(
        st.just(0),
        st.just(1),
        st.tuples(host, flags).map(lambda t: t[0] | t[1]),
        st.tuples(odd, flags).map(lambda t: t[0] | t[1]),
        st.integers(0, (1 << 64) - 1),  # compressed, reserved bits, anything
    )


@st.composite
def tables(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    cluster_bits = draw(st.integers(9, 21))
    version = draw(st.sampled_from([2, 3]))
    return cluster_bits, version, draw(st.lists(entries(cluster_bits), min_size=1, max_size=64))


@settings(max_examples=400, deadline=None)
@given(tables(), st.data())
def test_codes_and_faults_match_the_per_entry_rules(
    table: tuple[int, int, list[int]], data: st.DataObject
) -> None:
    cluster_bits, version, values = table
    m = mapping(cluster_bits, version)
    first = data.draw(st.integers(0, len(values) - 1))
    last = data.draw(st.integers(first + 1, len(values)))
    codes, faulty = scan_classify(array("Q", values), first, last, cluster_bits, version)
    want = [STATUS[classify(e)] for e in values[first:last]]
    assert [CODE_STATUS[codes[i : i + 1]] for i in range(len(codes))] == want
    faults = [m.entry_fault(e, classify(e), i) for i, e in enumerate(values[first:last])]
    assert faulty == any(faults)
    got = [(CODE_STATUS[c], b - a) for c, a, b in runs(codes)]
    assert got == [(s, len(list(g))) for s, g in itertools.groupby(want)]


def test_a_large_sparse_table_is_one_pass() -> None:
    """A table of 8192 entries, three of them data: five runs."""
    table = zero_table(8192)
    table[10] = table[11] = (1 << 63) | (5 << 16)
    table[8000] = 1
    codes, faulty = scan_classify(table, 0, 8192, 16, 3)
    assert not faulty
    assert [(CODE_STATUS[c], a, b) for c, a, b in runs(codes)] == [
        (STATUS[classify(0)], 0, 10),
        (STATUS[classify(table[10])], 10, 12),
        (STATUS[classify(0)], 12, 8000),
        (STATUS[classify(1)], 8000, 8001),
        (STATUS[classify(0)], 8001, 8192),
    ]
