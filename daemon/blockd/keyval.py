"""QEMU's ``key=value`` option syntax, as qemu-storage-daemon's command line takes it.

``--blockdev driver=qcow2,node-name=disk,file.driver=file,file.filename=a.qcow2``
is the form QSD's users write in their scripts and unit files, so blockd takes
it too.  The syntax is QEMU's keyval: pairs separated by commas (a doubled
comma stands for one), dotted keys for nested objects, keys of consecutive
numbers from 0 for lists, the last of repeated keys winning, and a first
pair without ``=`` giving the value of an implied key (``driver`` for
``--blockdev``).  Every value is a string; :func:`typed` then converts them
where the command's schema wants a boolean or a number, as QEMU's keyval
visitor does (``on``/``off``, ``yes``/``no``, ``true``/``false``; C integer
literals), so the result is exactly the JSON arguments a QMP client would send.

Sans-I/O: text in, arguments or :class:`KeyvalError` out.
"""

from __future__ import annotations

import re
from typing import Any

from jsonschema.exceptions import ValidationError

from blockd.qmp.schema import CommandSchema, Validator

_FRAGMENT = re.compile(r"[A-Za-z0-9_-]+\Z")
_INTEGER = re.compile(r"[+-]?(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)\Z")
_TRUE = ("on", "yes", "true", "y")
_FALSE = ("off", "no", "false", "n")


class KeyvalError(Exception):
    """The option is not valid ``key=value`` text, or a value has the wrong type."""


def _split(text: str) -> list[str]:
    """The pairs of ``text``, each with its doubled commas made single."""
    pairs: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            pairs.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    pairs.append("".join(current))
    return pairs


def parse(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """The tree of strings ``text`` describes (dicts, lists and strings)."""
    root: dict[str, Any] = {}
    if text == "":
        return root
    pairs = _split(text)
    if len(pairs) > 1 and pairs[-1] == "":
        pairs.pop()  # a trailing comma ends the list
    for index, pair in enumerate(pairs):
        key, sep, value = pair.partition("=")
        if not sep and pair:
            if index == 0 and implied_key is not None:
                key, value = implied_key, pair
            else:
                raise KeyvalError(f"Expected '=' after parameter '{pair}'")
        fragments = key.split(".")
        if not all(_FRAGMENT.match(f) for f in fragments):
            raise KeyvalError(f"Invalid parameter '{key}'")
        node = root
        for depth, fragment in enumerate(fragments[:-1]):
            child = node.setdefault(fragment, {})
            if not isinstance(child, dict):
                raise _inconsistent(".".join(fragments[: depth + 1]))
            node = child
        if isinstance(node.get(fragments[-1]), dict):
            raise _inconsistent(key)
        node[fragments[-1]] = value  # the last of repeated keys wins
    for key, value in root.items():
        if isinstance(value, dict):
            root[key] = _listify(value, f"{key}.")
    return root


def _inconsistent(key: str) -> KeyvalError:
    """A key used both for a value and for an object (or a list)."""
    return KeyvalError(f"Parameters '{key}.*' used inconsistently")


def _listify(node: dict[str, Any], prefix: str) -> dict[str, Any] | list[Any]:
    """Objects whose keys are all numbers become lists, numbered from 0 without gaps."""
    for key, value in node.items():
        if isinstance(value, dict):
            node[key] = _listify(value, f"{prefix}{key}.")
    numeric = [key for key in node if key.isdigit()]
    if not numeric:
        return node
    if len(numeric) != len(node):
        raise _inconsistent(prefix.rstrip("."))
    items: list[Any] = []
    for number in range(len(node)):
        if str(number) not in node:
            raise KeyvalError(f"Parameter '{prefix}{number}' missing")
        items.append(node[str(number)])
    return items


def _convert(value: str, kind: str, name: str) -> Any:
    if kind == "boolean":
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise KeyvalError(f"Parameter '{name}' expects 'on' or 'off'")
    if kind == "integer":
        if not _INTEGER.match(value):
            raise KeyvalError(f"Parameter '{name}' expects integer")
        digits = value.lstrip("+-")
        # C's rules (strtoll, base 0): 0x for hexadecimal, a leading 0 for octal
        base = 16 if digits[:2].lower() == "0x" else 8 if digits.startswith("0") else 10
        return int(value, base)
    try:
        return float(value)
    except ValueError:
        raise KeyvalError(f"Invalid parameter type for '{name}', expected: number") from None


def _conversion(error: ValidationError) -> str | None:
    """The scalar type a string at this error's place must become, if any."""
    if error.validator != "type" or not isinstance(error.instance, str):
        return None
    wanted = error.validator_value
    kinds = wanted if isinstance(wanted, list) else [wanted]
    scalars = [k for k in kinds if k in ("boolean", "integer", "number")]
    return scalars[0] if len(scalars) == 1 else None


def typed(command: CommandSchema, tree: dict[str, Any]) -> dict[str, Any]:
    """``tree`` with each string the schema wants as a boolean or number converted.

    The places are found by validating: a type error on a string is a value to
    convert.  Converting one may select another variant (a driver's members),
    so this repeats until no such error is left; what remains wrong is left
    for the command itself to report, in its usual words.
    """
    validator = Validator(command.schema, registry=command.registry)
    while True:
        changed = False
        for error in validator.iter_errors(tree):
            kind = _conversion(error)
            if kind is None:
                continue
            path = list(error.absolute_path)
            name = ".".join(str(p) for p in path)
            parent: Any = tree
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = _convert(error.instance, kind, name)
            changed = True
            break
        if not changed:
            return tree
