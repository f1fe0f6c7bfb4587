"""Command schemas: loading ``schema/``, validating arguments, QEMU's wording.

``schema/commands/<name>.json`` is the single source of the command set: its
root validates the ``arguments`` object and ``$defs.returns`` describes the
return value.  ``schema/types/`` holds shared definitions, referenced with
relative ``$ref``.  Files are checked once at start-up.

jsonschema finds every problem in an argument object; QEMU reports only the
first one its visitor meets, walking members in declaration order and looking
for unexpected members last.  :func:`first_error` orders jsonschema's errors
the same way (by the position of each error in the schema file, so a file's
member order is its visiting order) and words the first one as QEMU does.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import referencing
import referencing.jsonschema
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

BASE_URI = "https://blockd.invalid/schema/"

#: Keywords whose failures this module can word as QEMU does (plus the
#: annotation ``x-qapi-features``: QAPI feature flags such as "unstable" that
#: query-qmp-schema reports and validation ignores).  A schema using
#: any other validation keyword is refused at start-up rather than producing
#: an error text no QEMU client has seen.
_KNOWN_KEYWORDS = frozenset(
    {
        "$schema", "$id", "$ref", "$defs", "$comment", "title", "description",
        "deprecated", "default", "examples", "type", "properties", "required",
        "additionalProperties", "unevaluatedProperties", "items", "enum", "const",
        "minimum", "maximum", "x-qapi-features",
        "allOf", "if", "then", "else",
    }
)  # fmt: skip


def _is_integer(_checker: Any, instance: Any) -> bool:
    # QEMU distinguishes 1 from 1.0 (a float is not an integer) and bools from ints.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(_checker: Any, instance: Any) -> bool:
    return isinstance(instance, int | float) and not isinstance(instance, bool)


_TYPE_CHECKER = Draft202012Validator.TYPE_CHECKER.redefine_many(
    {"integer": _is_integer, "number": _is_number}
)


# The keywords below replace jsonschema's own for two reasons.  Its messages
# quote the instance with repr(), which is slow for a large value and fails
# outright for one nested a thousand levels (QEMU's JSON allows 1024); the
# dispatcher words every error itself and never reads those messages.  And its
# unevaluatedProperties re-validates every allOf branch, and through it the
# whole nested value, to learn which members were looked at: for
# BlockdevOptions, whose ``file`` and ``backing`` nest BlockdevOptions again,
# that is exponential in the nesting (twelve levels blocked the event loop for
# half a minute).  Here the evaluated members are those the schema declares,
# in its properties and in the branches whose ``if`` holds, found without
# validating anything twice.


def _type(validator: Any, types: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    kinds = types if isinstance(types, list) else [types]
    if not any(validator.is_type(instance, kind) for kind in kinds):
        yield ValidationError("wrong type")


def _enum(validator: Any, enums: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not any(type(instance) is type(e) and instance == e for e in enums):
        yield ValidationError("not one of the values")


def _const(validator: Any, const: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not (type(instance) is type(const) and instance == const):
        yield ValidationError("not the value")


def _unevaluated_properties(
    validator: Any, unevaluated: Any, instance: Any, schema: Any
) -> Iterator[ValidationError]:
    if unevaluated is not False:
        raise SchemaError("unevaluatedProperties must be false")
    if not validator.is_type(instance, "object"):
        return
    known = _known_members(validator._resolver._registry, schema, validator._resolver, instance)
    if any(key not in known for key in instance):
        yield ValidationError("unexpected member")


Validator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    validators={
        "type": _type,
        "enum": _enum,
        "const": _const,
        "unevaluatedProperties": _unevaluated_properties,
    },
    type_checker=_TYPE_CHECKER,
)


class SchemaError(Exception):
    """The schema directory itself is broken; blockd refuses to start."""


@dataclass(frozen=True)
class CommandSchema:
    name: str
    schema: Mapping[str, Any]
    registry: referencing.Registry[Any]

    @property
    def uri(self) -> str:
        return str(self.schema["$id"])

    @functools.cached_property
    def _validator(self) -> Any:
        return Validator(self.schema, registry=self.registry)

    @functools.cached_property
    def _accepts_no_arguments(self) -> bool:
        """Whether an empty argument object is valid: then the commonest request
        of all, a query without arguments, needs no validation at all (a
        jsonschema pass costs hundreds of microseconds even for ``{}``)."""
        return bool(self._validator.is_valid({}))

    def check_arguments(self, arguments: Mapping[str, Any]) -> str | None:
        """QEMU's text for the first problem in ``arguments``, or None if valid."""
        if not arguments and self._accepts_no_arguments:
            return None
        try:
            return first_error(self, self._validator.iter_errors(arguments))
        except RecursionError:
            # Only values the schema describes that deep (inline backing
            # chains) are walked that far; a wrong type is found at its top.
            return f"Parameter '{_full_name(_too_deep(arguments) or [])}' is nested too deeply"

    def return_validator(self) -> Any:
        """A validator for this command's return value (``$defs.returns``)."""
        return Validator({"$ref": self.uri + "#/$defs/returns"}, registry=self.registry)


#: Where an argument too deep to validate is reported (QEMU has no limit of
#: its own below JSON's 1024).  jsonschema recurses about a dozen Python
#: frames per level it walks, and meets the interpreter's recursion limit
#: near 80 levels of inline backing nodes (one level per image).
MAX_ARGUMENT_DEPTH = 64


def _too_deep(arguments: Any) -> list[Any] | None:
    """The path of the first value nested deeper than MAX_ARGUMENT_DEPTH, if any."""
    todo: list[tuple[Any, list[Any]]] = [(arguments, [])]
    while todo:
        value, path = todo.pop()
        if len(path) > MAX_ARGUMENT_DEPTH:
            return path
        if isinstance(value, dict):
            todo += [(v, [*path, k]) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(v, [*path, i]) for i, v in enumerate(value)]
    return None


def schema_root() -> Traversable:
    """Where ``schema/`` is: inside an installed package, or in the source tree."""
    packaged = resources.files("blockd") / "schema"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "schema"


def _read_tree(root: Traversable, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        relative = prefix + entry.name
        if entry.is_dir():
            yield from _read_tree(entry, relative + "/")
        elif entry.name.endswith(".json"):
            try:
                yield relative, json.loads(entry.read_text(encoding="utf-8"))
            except ValueError as err:
                raise SchemaError(f"schema/{relative}: not valid JSON: {err}") from None


def _check_keywords(node: Any, where: str) -> None:
    if isinstance(node, list):
        for item in node:
            _check_keywords(item, where)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key not in _KNOWN_KEYWORDS:
            raise SchemaError(f"{where}: keyword {key!r} is not supported by the dispatcher")
        if key in ("properties", "$defs"):
            for sub in value.values():
                _check_keywords(sub, where)
        elif key in (
            "items",
            "additionalProperties",
            "unevaluatedProperties",
            "allOf",
            "if",
            "then",
            "else",
        ):
            _check_keywords(value, where)


def load_command_schemas(root: Traversable | None = None) -> dict[str, CommandSchema]:
    """Load and check every schema file; the result is keyed by command name."""
    root = root if root is not None else schema_root()
    documents = dict(_read_tree(root))
    resources_ = []
    for relative, contents in documents.items():
        if not isinstance(contents, dict):
            raise SchemaError(f"schema/{relative}: a schema must be a JSON object")
        contents.setdefault("$id", BASE_URI + relative)
        try:
            Validator.check_schema(contents)
        except Exception as err:
            raise SchemaError(f"schema/{relative}: {err}") from None
        _check_keywords(contents, f"schema/{relative}")
        # Without "$schema", a file reached through "$ref" is checked by this
        # module's Validator too, not by the stock one that jsonschema would
        # pick for the dialect (with its integer rule and slow keywords).
        contents.pop("$schema", None)
        resources_.append(
            (
                contents["$id"],
                referencing.Resource.from_contents(
                    contents, default_specification=referencing.jsonschema.DRAFT202012
                ),
            )
        )
    registry: referencing.Registry[Any] = referencing.Registry().with_resources(resources_)
    commands: dict[str, CommandSchema] = {}
    for relative, contents in documents.items():
        if not relative.startswith("commands/"):
            continue
        name = relative.removeprefix("commands/").removesuffix(".json")
        if contents.get("title") != name:
            raise SchemaError(f"schema/{relative}: title must be the command name {name!r}")
        if contents.get("type") != "object" or "returns" not in contents.get("$defs", {}):
            raise SchemaError(
                f"schema/{relative}: must describe an object of arguments and $defs.returns"
            )
        commands[name] = CommandSchema(name=name, schema=contents, registry=registry)
    return commands


def _full_name(path: Iterable[Any]) -> str:
    """Render an instance path the way QEMU names a member: ``a.b[2].c``."""
    name = ""
    for part in path:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name = f"{name}.{part}" if name else str(part)
    return name


def _member(parent: Sequence[Any], member: str) -> str:
    return _full_name([*parent, member])


_OBJECT_CLOSERS = ("additionalProperties", "unevaluatedProperties")


@dataclass
class _Located:
    """Where in the schema files an error arose, and its visiting-order position."""

    positions: tuple[int, ...]
    node: Any
    resolver: Any
    registry: referencing.Registry[Any]


def _deref(node: Any, resolver: Any) -> tuple[Any, Any]:
    while isinstance(node, dict) and "$ref" in node:
        resolved = resolver.lookup(node["$ref"])
        node, resolver = resolved.contents, resolved.resolver
    return node, resolver


def _locate(command: CommandSchema, error: ValidationError) -> _Located:
    """Walk the error's schema path through the files, following ``$ref``.

    Each step's position is the index of the key taken in its (ordered) JSON
    object, so sorting by positions is sorting by place in the files; a
    missing member sorts where it is declared, and an unexpected one after
    every declared member of its object, as QEMU's visitor meets them.
    """
    node: Any = command.schema
    resolver: Any = command.registry.resolver(base_uri=command.uri)
    positions: list[int] = []
    path = list(error.absolute_schema_path)
    for index, part in enumerate(path):
        if isinstance(node, dict) and part not in node:
            # jsonschema leaves "$ref" out of the path.
            node, resolver = _deref(node, resolver)
        if isinstance(node, list):
            positions.append(int(part))
            node = node[int(part)]
            continue
        keys = list(node)
        if index == len(path) - 1:
            if part == "required":
                declared = list(node.get("properties", {}))
                missing = _missing(error)
                positions.append(keys.index("properties") if "properties" in keys else len(keys))
                positions.append(declared.index(missing) if missing in declared else 0)
                break
            if part in _OBJECT_CLOSERS:
                positions.append(len(keys) + 1)
                break
        positions.append(keys.index(part))
        if index < len(path) - 1:
            node = node[part]
    return _Located(tuple(positions), node, resolver, command.registry)


def _known_members(
    registry: referencing.Registry[Any], node: Any, resolver: Any, instance: Any
) -> set[str]:
    """Members an object schema declares for this instance, its variants included."""
    node, resolver = _deref(node, resolver)
    if not isinstance(node, dict):
        return set()
    names = set(node.get("properties", {}))
    for sub in node.get("allOf", []):
        names |= _known_members(registry, sub, resolver, instance)
    if "if" in node:
        condition = Validator(node["if"], registry=registry)
        branch = "then" if condition.is_valid(instance) else "else"
        if branch in node:
            names |= _known_members(registry, node[branch], resolver, instance)
    return names


def _missing(error: ValidationError) -> str:
    instance = error.instance if isinstance(error.instance, dict) else {}
    required: Any = error.validator_value
    return next(str(name) for name in required if name not in instance)


def _leaf(path: Sequence[Any]) -> str:
    """QEMU names enum and alternate members by their own name, list elements 'null'."""
    return path[-1] if path and isinstance(path[-1], str) else "null"


#: the ``maximum`` that marks a QAPI ``uint64`` / ``size`` member (whose
#: minimum is INT64_MIN: QEMU takes negative numbers there too)
_UINT64_MAX = (1 << 64) - 1


def _word(error: ValidationError, where: _Located) -> str:
    parent = error.absolute_path
    keyword = error.validator
    instance: Any = error.instance
    if keyword == "required":
        return f"Parameter '{_member(parent, _missing(error))}' is missing"
    if keyword in _OBJECT_CLOSERS:
        known = _known_members(where.registry, where.node, where.resolver, instance)
        extra = next(str(k) for k in instance if k not in known)
        return f"Parameter '{_member(parent, extra)}' is unexpected"
    if keyword in ("type", "minimum", "maximum"):
        schema: Any = error.schema
        kind = schema.get("type") if isinstance(schema, Mapping) else None
        if isinstance(kind, list):
            # An alternate: QEMU names the alternate type and the bare member.
            return f"Invalid parameter type for '{_leaf(parent)}', expected: {schema.get('title')}"
        if isinstance(schema, Mapping) and schema.get("maximum") == _UINT64_MAX:
            # QAPI's uint64 and size: any value that is no such number, one word
            return f"Parameter '{_full_name(parent)}' expects uint64"
        # One message for a wrong JSON type and for an int64 overflow.
        return f"Invalid parameter type for '{_full_name(parent)}', expected: {kind}"
    if keyword in ("enum", "const"):
        return f"Parameter '{_leaf(parent)}' does not accept value '{instance}'"
    return f"Parameter '{_full_name(parent)}' is invalid"


def first_error(command: CommandSchema, errors: Iterable[ValidationError]) -> str | None:
    located = [(_locate(command, e), e) for e in errors]
    if not located:
        return None
    where, error = min(located, key=lambda pair: pair[0].positions)
    return _word(error, where)
