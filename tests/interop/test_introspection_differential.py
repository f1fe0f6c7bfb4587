"""query-qmp-schema against qemu-storage-daemon 7.2: what a client can probe.

For every command blockd implements, the arguments must have the same
members, optional or not, deprecated or not, with the same builtin types and
the same enum values as QEMU's; unions the same tag; variants blockd supports
the same members.  And the introspection must be self-consistent.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import DaemonProcess, RawQMP

pytestmark = pytest.mark.qsd

BUILTINS = {"str", "int", "number", "bool", "null", "any"}
#: Members whose types differ on purpose: blockd accepts an ``encrypt`` object
#: only to refuse it clearly, so it does not describe QEMU's whole union.
LOOSER = {"encrypt"}
#: Variants QEMU has and blockd does not implement (blockd's are compared).
SUPPORTED_DRIVERS = {"file", "qcow2", "raw"}


def fetch(daemon: DaemonProcess) -> dict[str, dict[str, Any]]:
    with RawQMP(daemon.socket_path) as client:
        client.negotiate()
        entries = client.execute("query-qmp-schema")["return"]
    return {e["name"]: e for e in entries}


def shape(schema: dict[str, dict[str, Any]], name: str, depth: int = 2) -> Any:
    """A comparable description of a type, type names masked."""
    if name in BUILTINS:
        return name
    entry = schema[name]
    kind = entry["meta-type"]
    if kind == "enum":
        return ("enum", sorted(entry["values"]))
    if kind == "array":
        return ("array", shape(schema, entry["element-type"], depth))
    if depth == 0:
        return kind
    if kind == "alternate":
        return ("alternate", sorted(str(shape(schema, m["type"], 0)) for m in entry["members"]))
    members = [
        (
            m["name"],
            "default" in m,
            tuple(m.get("features", [])),
            "*" if m["name"] in LOOSER else shape(schema, m["type"], depth - 1),
        )
        for m in entry["members"]
        # downstream extension members (QAPI's __RFQDN_ prefix) are blockd's
        # own: see test_extension_members_are_listed
        if not m["name"].startswith("__org.blockd_")
    ]
    return ("object", entry.get("tag"), sorted(members))


def test_arguments_match_qemu(qsd: DaemonProcess, blockd: DaemonProcess) -> None:
    theirs, ours = fetch(qsd), fetch(blockd)
    # downstream extensions (QAPI's __RFQDN_ prefix) are blockd's own
    commands = [n for n, e in ours.items()
                if e["meta-type"] == "command" and not n.startswith("__org.blockd_")]  # fmt: skip
    assert len(commands) > 20
    for name in commands:
        assert name in theirs, f"{name} is not a qemu-storage-daemon 7.2 command"
        assert ours[name].get("features") == theirs[name].get("features"), name
        # their driver / action lists are smaller: see the tests of their variants
        if name not in ("blockdev-add", "transaction"):
            assert shape(ours, ours[name]["arg-type"]) == shape(theirs, theirs[name]["arg-type"]), (
                name
            )
    for event in (n for n, e in ours.items() if e["meta-type"] == "event"):
        assert shape(ours, ours[event]["arg-type"]) == shape(theirs, theirs[event]["arg-type"]), (
            event
        )


def test_extension_members_are_listed(blockd: DaemonProcess) -> None:
    """block-commit's ``__org.blockd_copy-mode``: optional, with its three values."""
    ours = fetch(blockd)
    commit = ours[ours["block-commit"]["arg-type"]]
    [member] = [m for m in commit["members"] if m["name"] == "__org.blockd_copy-mode"]
    assert "default" in member
    assert shape(ours, member["type"]) == ("enum", ["auto", "background", "write-blocking"])


def test_blockdev_add_variants_match_qemu(qsd: DaemonProcess, blockd: DaemonProcess) -> None:
    theirs, ours = fetch(qsd), fetch(blockd)

    def variants(schema: dict[str, dict[str, Any]]) -> dict[str, Any]:
        union = schema[schema["blockdev-add"]["arg-type"]]
        assert union["tag"] == "driver"
        return {v["case"]: shape(schema, v["type"], 1) for v in union["variants"]}

    mine, qemu = variants(ours), variants(theirs)
    for driver in SUPPORTED_DRIVERS:
        assert mine[driver] == qemu[driver], driver
    # The common members are QEMU's; the drivers are the ones blockd has.
    base_ours = shape(ours, ours["blockdev-add"]["arg-type"], 1)
    base_theirs = shape(theirs, theirs["blockdev-add"]["arg-type"], 1)
    drivers = {m[0]: m[3] for m in base_ours[2]}["driver"][1]
    assert set(drivers) <= set({m[0]: m[3] for m in base_theirs[2]}["driver"][1])
    assert set(drivers) >= SUPPORTED_DRIVERS
    assert [m for m in base_ours[2] if m[0] != "driver"] == [
        m for m in base_theirs[2] if m[0] != "driver"
    ]


def test_transaction_variants_match_qemu(qsd: DaemonProcess, blockd: DaemonProcess) -> None:
    """The action types blockd has are QEMU's, each with QEMU's members."""
    theirs, ours = fetch(qsd), fetch(blockd)

    def action(schema: dict[str, dict[str, Any]]) -> dict[str, Any]:
        args = schema[schema["transaction"]["arg-type"]]
        members = {m["name"]: m for m in args["members"]}
        assert "default" not in members["actions"] and "default" in members["properties"]
        return schema[schema[members["actions"]["type"]]["element-type"]]

    mine, qemu = action(ours), action(theirs)
    assert mine["tag"] == qemu["tag"] == "type"
    kinds = {v["case"]: v["type"] for v in mine["variants"]}
    assert set(kinds) == {"abort", "blockdev-snapshot", "blockdev-snapshot-sync"}
    qemu_kinds = {v["case"]: v["type"] for v in qemu["variants"]}
    for kind, name in kinds.items():
        assert shape(ours, name, 3) == shape(theirs, qemu_kinds[kind], 3), kind
    props = [shape(s, s[s["transaction"]["arg-type"]]["members"][1]["type"])
             for s in (ours, theirs)]  # fmt: skip
    assert props[0] == props[1]


def test_introspection_is_self_consistent(blockd: DaemonProcess) -> None:
    schema = fetch(blockd)
    with RawQMP(blockd.socket_path) as client:
        client.negotiate()
        names = {c["name"] for c in client.execute("query-commands")["return"]}
    assert {n for n, e in schema.items() if e["meta-type"] == "command"} == names
    for entry in schema.values():
        for key in ("arg-type", "ret-type", "element-type"):
            if key in entry:
                assert entry[key] in schema, (entry, key)
        for member in entry.get("members", []):
            if "type" in member:
                assert member["type"] in schema, (entry["name"], member)
    # What libvirt probes for, and what 7.2 does not have.
    commit = {m["name"]: m for m in schema[schema["block-commit"]["arg-type"]]["members"]}
    assert "backing-file" in commit and "backing-mask-protocol" not in commit
    assert commit["top"]["features"] == ["deprecated"]
