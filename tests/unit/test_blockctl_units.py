"""blockctl's rates, sizes and file names, as people and QMP write them."""

from __future__ import annotations

import json

import pytest

from blockd.ctl.graph import plain_filename
from blockd.ctl.units import human_duration, human_size, parse_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0", 0), ("4096", 4096), ("64K", 64 << 10), ("100M", 100 << 20), ("100m", 100 << 20),
     ("1.5G", 3 << 29), ("2T", 2 << 40), ("64KiB", 64 << 10), ("10MiB/s", 10 << 20),
     ("100MB", 100 << 20), (" 8M ", 8 << 20)],
)  # fmt: skip
def test_rates(text: str, expected: int) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["", "fast", "-1M", "1X", "M", "1.2.3M", "9" * 30])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


def test_sizes_and_durations() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1536 << 10, 1 << 30, 5 << 40, 1 << 50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 MiB", "1.0 GiB", "5.0 TiB", "1024.0 TiB",
    ]  # fmt: skip
    assert human_duration(0) == "0:00:00"
    assert human_duration(59.6) == "0:01:00"
    assert human_duration(3725) == "1:02:05"


def test_plain_filename_of_json_pseudo_names() -> None:
    nested = {"driver": "qcow2", "backing": {"driver": "qcow2",
              "file": {"driver": "file", "filename": "/b.qcow2"}},
              "file": {"driver": "file", "filename": "/t.qcow2"}}  # fmt: skip
    assert plain_filename("json:" + json.dumps(nested)) == "/t.qcow2"
    assert plain_filename("/plain.qcow2") == "/plain.qcow2"
    assert plain_filename("json:{not json") == "json:{not json"
    assert plain_filename('json:{"driver": "null-co"}') == 'json:{"driver": "null-co"}'
