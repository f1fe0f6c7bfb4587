"""The start-up configuration file and --blockdev, checked before anything starts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from blockd.config import Config, ConfigError, load_config, parse_option


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "blockd.toml"
    path.write_text(text)
    return load_config(path)


def test_full_file(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """
socket = "run/qmp.sock"
socket-mode = "0640"
log-level = "debug"

[[blockdev]]
driver = "file"
node-name = "f0"
filename = "/images/base.qcow2"

[[blockdev]]
driver = "qcow2"
node-name = "disk0"
file = "f0"
read-only = true
""",
    )
    assert config.socket == tmp_path / "run" / "qmp.sock"
    assert config.socket_mode == 0o640
    assert config.log_level == "debug"
    assert config.blockdevs == (
        {"driver": "file", "node-name": "f0", "filename": "/images/base.qcow2"},
        {"driver": "qcow2", "node-name": "disk0", "file": "f0", "read-only": True},
    )


def test_empty_file_sets_nothing(tmp_path: Path) -> None:
    assert _load(tmp_path, "# nothing\n") == Config()


def test_absolute_socket_path_is_kept(tmp_path: Path) -> None:
    assert _load(tmp_path, 'socket = "/run/blockd/x.sock"').socket == Path("/run/blockd/x.sock")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('log-level = "info"\nsocket = \n', "line 2, column 10"),
        ('socket = "a"\nsocket = "b"\n', "line 2"),
        ('log-level = "info"\nsocket-mode = 600\n', "line 2: key 'socket-mode': expected a string"),
        ('socket-mode = "0999"', "line 1: key 'socket-mode': not an octal file mode"),
        ('socket-mode = "01777"', "key 'socket-mode': file mode out of range"),
        ("socket = 5", "key 'socket': expected a string (the socket's path), got an integer (5)"),
        ('log-level = "verbose"', "key 'log-level': 'verbose' is not one of debug, info"),
        ('\n\nsokcet = "x"', "line 3: key 'sokcet': unknown key (known keys: socket,"),
        ('[blockdev]\ndriver = "file"', "key 'blockdev': expected an array of tables"),
        ("blockdev = [1]", "key 'blockdev[0]': expected a table of blockdev-add arguments"),
        (
            '[[blockdev]]\ndriver = "file"\n[[blockdev]]\nwhen = 1979-05-27',
            "key 'blockdev[1].when': a date has no JSON form",
        ),
    ],
)
def test_bad_file_is_refused_with_line_or_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, text)
    assert message in str(caught.value)
    assert str(tmp_path / "blockd.toml") in str(caught.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*nope\.toml: No such file"):
        load_config(tmp_path / "nope.toml")


def test_blockdev_option_is_json() -> None:
    assert parse_option("--blockdev", '{"driver": "null-co", "node-name": "n"}') == {
        "driver": "null-co",
        "node-name": "n",
    }


def test_blockdev_option_as_key_value_pairs() -> None:
    """Typed by the blockdev-add schema of the driver named (see also
    tests/interop/test_keyval_differential.py, beside qemu-storage-daemon)."""
    text = (
        "qcow2,node-name=x,read-only=on,file.driver=file,file.filename=a,,b,"
        "cache-clean-interval=0x10,discard=unmap"
    )
    assert parse_option("--blockdev", text) == {
        "driver": "qcow2",
        "node-name": "x",
        "read-only": True,
        "file": {"driver": "file", "filename": "a,b"},
        "cache-clean-interval": 16,
        "discard": "unmap",
    }
    blkdebug = "driver=blkdebug,image=img,inject-error.0.event=read_aio,inject-error.0.errno=010"
    rules = parse_option("--blockdev", blkdebug)["inject-error"]
    assert rules == [{"event": "read_aio", "errno": 8}]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("driver=qcow2,read-only=1", "Parameter 'read-only' expects 'on' or 'off'"),
        ("driver=qcow2,a.0=1,a.b=2", r"Parameters 'a\.\*' used inconsistently"),
        ('{"driver": ', "not valid JSON"),
    ],
)
def test_bad_blockdev_option(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_option("--blockdev", text)


def test_shipped_example_is_valid(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "systemd" / "blockd.toml"
    assert load_config(example) == Config(log_level="info")
    # The commented tables are valid too, once uncommented.
    lines = example.read_text().splitlines()
    start = lines.index("# [[blockdev]]")
    uncommented = "\n".join(
        line.removeprefix("# ")
        for line in lines[start:]
        if re.match(r"# (\[|[a-z-]+ = )", line)
    )
    node = tomllib.loads(uncommented)["blockdev"][0]
    assert node["driver"] == "qcow2"
    assert node["file"]["filename"].startswith("/var/lib/images/")
    (tmp_path / "full.toml").write_text(uncommented)
    config = load_config(tmp_path / "full.toml")
    assert [(step.command, step.arguments.get("node-name")) for step in config.startup()] == [
        ("blockdev-add", "disk0"),
        ("nbd-server-start", None),
        ("block-export-add", "disk0"),
    ]
    # the address as nbd-server-start takes it
    assert config.startup()[1].arguments == {
        "addr": {"type": "unix", "data": {"path": "/run/blockd/nbd.sock"}}
    }
