"""QEMU's rule for the names clients give things (node names, job and export ids).

A letter first, then letters, digits, ``-``, ``.`` and ``_``, all ASCII
(QEMU's ``id_wellformed``); each caller words its own refusal, as QEMU does.
"""

from __future__ import annotations

import re

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def well_formed(name: str) -> bool:
    return _WELL_FORMED.match(name) is not None
