"""``query-qmp-schema``: the command set described in QAPI's introspection form.

Management tools (libvirt first) read this at connection time and decide
what to send from it, e.g. by probing ``block-commit/arg-type/backing-file``.
It is derived from the same schema files that validate arguments, so it can
never promise a member the dispatcher would refuse.  As in QEMU, only
command, event and builtin types keep their names; every other type gets a
number, ``"0"`` being the empty object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from blockd.qmp.schema import BASE_URI, CommandSchema

_SCALARS = {
    "string": "str",
    "integer": "int",
    "number": "number",
    "boolean": "bool",
    "null": "null",
}
_BUILTINS = [
    ("str", "string"),
    ("any", "value"),
    ("bool", "boolean"),
    ("int", "int"),
    ("null", "null"),
    ("number", "number"),
]


class _Builder:
    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self.types: list[dict[str, Any]] = [{"name": "0", "members": [], "meta-type": "object"}]
        self._names: dict[int, str] = {}
        self._arrays: set[str] = set()
        #: Schemas made here, kept alive so that their ids stay unique.
        self._made: list[dict[str, Any]] = []

    def arguments_of(self, schema: Mapping[str, Any], resolver: Any) -> str:
        """The type of a command's arguments: its schema file without ``$defs``."""
        root = {k: v for k, v in schema.items() if k != "$defs"}
        self._made.append(root)
        return self.type_of(root, resolver)

    def _deref(self, node: Any, resolver: Any) -> tuple[Any, Any]:
        while isinstance(node, dict) and "$ref" in node:
            resolved = resolver.lookup(node["$ref"])
            node, resolver = resolved.contents, resolved.resolver
        return node, resolver

    def _new(self, key: int, entry: dict[str, Any]) -> str:
        name = str(len(self.types))
        self._names[key] = name
        entry["name"] = name
        self.types.append(entry)
        return name

    def type_of(self, node: Any, resolver: Any) -> str:
        node, resolver = self._deref(node, resolver)
        if not isinstance(node, dict) or "type" not in node:
            return "any"
        if id(node) in self._names:
            return self._names[id(node)]
        kind = node["type"]
        if isinstance(kind, list):
            return self._alternate(node, resolver, kind)
        if kind == "string" and "enum" in node:
            values = list(node["enum"])
            entry = {"members": [{"name": v} for v in values], "values": values}
            return self._new(id(node), {**entry, "meta-type": "enum"})
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "array":
            items = node.get("items")
            element = self.type_of(items, resolver) if isinstance(items, dict) else "any"
            name = f"[{element}]"
            if name not in self._arrays:
                self._arrays.add(name)
                self.types.append({"name": name, "element-type": element, "meta-type": "array"})
            return name
        return self._object(node, resolver)

    def _alternate(self, node: dict[str, Any], resolver: Any, kinds: list[str]) -> str:
        entry: dict[str, Any] = {"members": [], "meta-type": "alternate"}
        name = self._new(id(node), entry)
        for kind in kinds:
            if kind == "object" and "then" in node:
                entry["members"].append({"type": self.type_of(node["then"], resolver)})
            elif kind == "object":
                entry["members"].append({"type": "any"})
            else:
                entry["members"].append({"type": _SCALARS[kind]})
        return name

    def _object(self, node: dict[str, Any], resolver: Any) -> str:
        properties = node.get("properties", {})
        if not properties and "allOf" not in node:
            return "0" if node.get("additionalProperties") is False else "any"
        entry: dict[str, Any] = {"members": [], "meta-type": "object"}
        name = self._new(id(node), entry)
        required = set(node.get("required", []))
        for member, sub in properties.items():
            info: dict[str, Any] = {"name": member, "type": self.type_of(sub, resolver)}
            if member not in required:
                info["default"] = None
            if isinstance(sub, dict):
                features = (["deprecated"] if sub.get("deprecated") else []) + list(
                    sub.get("x-qapi-features", [])
                )
                if features:
                    info["features"] = features
            entry["members"].append(info)
        variants = []
        for branch in node.get("allOf", []):
            condition = branch.get("if", {}).get("properties", {})
            if len(condition) == 1 and "then" in branch:
                tag, match = next(iter(condition.items()))
                entry["tag"] = tag
                variants.append(
                    {"case": match["const"], "type": self.type_of(branch["then"], resolver)}
                )
        if variants:
            entry["variants"] = variants
        return name


def build_schema(commands: Mapping[str, CommandSchema]) -> list[dict[str, Any]]:
    """SchemaInfo entries for every command and event, and the types they use."""
    if not commands:
        return []
    registry = next(iter(commands.values())).registry
    builder = _Builder(registry)
    entries: list[dict[str, Any]] = []
    for name in sorted(commands):
        command = commands[name]
        resolver = registry.resolver(base_uri=command.uri)
        arguments = builder.arguments_of(command.schema, resolver)
        returns = builder.type_of(command.schema["$defs"]["returns"], resolver)
        entry: dict[str, Any] = {
            "name": name, "arg-type": arguments, "ret-type": returns, "meta-type": "command"
        }  # fmt: skip
        features = (["deprecated"] if command.schema.get("deprecated") else []) + list(
            command.schema.get("x-qapi-features", [])
        )
        if features:
            entry["features"] = features
        entries.append(entry)
    for uri in sorted(u for u in registry if u.startswith(BASE_URI + "events/")):
        event = registry.contents(uri)
        arguments = builder.type_of(event, registry.resolver(base_uri=uri))
        entries.append({"name": event["title"], "arg-type": arguments, "meta-type": "event"})
    entries += builder.types
    entries += [
        {"name": name, "json-type": json_type, "meta-type": "builtin"}
        for name, json_type in _BUILTINS
    ]
    return entries
