"""Schema loading, and argument errors worded as QEMU words them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockd.commands import HANDLERS
from blockd.qmp.schema import CommandSchema, SchemaError, load_command_schemas

SAMPLE = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "sample",
    "type": "object",
    "properties": {
        "device": {"type": "string"},
        "speed": {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1},
        "on-error": {"type": "string", "enum": ["report", "ignore"]},
        "file": {"$ref": "../types/File.json"},
        "enable": {"type": "array", "items": {"type": "string", "enum": ["oob"]}},
        "flag": {"type": "boolean"},
    },
    "required": ["device"],
    "additionalProperties": False,
    "$defs": {"returns": {"type": "object"}},
}
FILE_TYPE = {
    "type": "object",
    "properties": {
        "driver": {"type": "string", "enum": ["file"]},
        "filename": {"type": "string"},
    },
    "required": ["driver", "filename"],
    "additionalProperties": False,
}


@pytest.fixture
def sample(tmp_path: Path) -> CommandSchema:
    (tmp_path / "commands").mkdir()
    (tmp_path / "types").mkdir()
    (tmp_path / "commands" / "sample.json").write_text(json.dumps(SAMPLE))
    (tmp_path / "types" / "File.json").write_text(json.dumps(FILE_TYPE))
    return load_command_schemas(tmp_path)["sample"]


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"device": "d"}, None),
        ({}, "Parameter 'device' is missing"),
        ({"speed": "x"}, "Parameter 'device' is missing"),
        ({"device": "d", "bogus": 1}, "Parameter 'bogus' is unexpected"),
        ({"bogus": 1}, "Parameter 'device' is missing"),
        (
            {"device": "d", "speed": "x", "bogus": 1},
            "Invalid parameter type for 'speed', expected: integer",
        ),
        ({"device": "d", "speed": 1.5}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": 1.0}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": 2**63}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": True}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": "d", "speed": None}, "Invalid parameter type for 'speed', expected: integer"),
        ({"device": 1}, "Invalid parameter type for 'device', expected: string"),
        ({"device": "d", "flag": "yes"}, "Invalid parameter type for 'flag', expected: boolean"),
        (
            {"device": "d", "on-error": "bogus"},
            "Parameter 'on-error' does not accept value 'bogus'",
        ),
        ({"device": "d", "on-error": 3}, "Invalid parameter type for 'on-error', expected: string"),
        ({"device": "d", "enable": "oob"}, "Invalid parameter type for 'enable', expected: array"),
        ({"device": "d", "enable": ["foo"]}, "Parameter 'null' does not accept value 'foo'"),
        (
            {"device": "d", "enable": [1]},
            "Invalid parameter type for 'enable[0]', expected: string",
        ),
        ({"device": "d", "file": 3}, "Invalid parameter type for 'file', expected: object"),
        ({"device": "d", "file": {"driver": "file"}}, "Parameter 'file.filename' is missing"),
        (
            {"device": "d", "file": {"driver": "file", "filename": "f", "x": 1}},
            "Parameter 'file.x' is unexpected",
        ),
        (
            {"device": "d", "file": {"driver": "nfs", "filename": "f"}},
            "Parameter 'driver' does not accept value 'nfs'",
        ),
        ({"device": "d", "file": {"filename": 1}}, "Parameter 'file.driver' is missing"),
        # Members are visited in declaration order, whatever the input order.
        (
            {"flag": 1, "device": "d", "speed": "s"},
            "Invalid parameter type for 'speed', expected: integer",
        ),
    ],
)
def test_first_error_in_qemu_words(
    sample: CommandSchema, arguments: dict[str, object], expected: str | None
) -> None:
    assert sample.check_arguments(arguments) == expected


def test_real_schemas_load_and_match_the_handlers() -> None:
    schemas = load_command_schemas()
    protocol_commands = {"qmp_capabilities", "query-commands", "query-qmp-schema"}
    assert set(schemas) == set(HANDLERS) | protocol_commands


def test_title_must_name_the_command(tmp_path: Path) -> None:
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "a.json").write_text(
        json.dumps({**SAMPLE, "title": "b", "properties": {}})
    )
    with pytest.raises(SchemaError, match="title must be the command name 'a'"):
        load_command_schemas(tmp_path)


def test_unsupported_keyword_is_refused(tmp_path: Path) -> None:
    (tmp_path / "commands").mkdir()
    bad = {**SAMPLE, "title": "a", "properties": {"x": {"type": "string", "pattern": "^a"}}}
    (tmp_path / "commands" / "a.json").write_text(json.dumps(bad))
    with pytest.raises(SchemaError, match="'pattern' is not supported"):
        load_command_schemas(tmp_path)


def test_invalid_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "a.json").write_text(json.dumps({**SAMPLE, "title": "a", "type": 5}))
    with pytest.raises(SchemaError, match=r"schema/commands/a\.json"):
        load_command_schemas(tmp_path)


def test_broken_json_is_refused(tmp_path: Path) -> None:
    (tmp_path / "commands").mkdir()
    (tmp_path / "commands" / "a.json").write_text("{")
    with pytest.raises(SchemaError, match="not valid JSON"):
        load_command_schemas(tmp_path)
