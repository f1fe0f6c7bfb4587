"""The version blockd reports in the QMP greeting and in ``query-version``.

Clients pick features by QEMU version, so blockd claims the QEMU release whose
behaviour it reproduces and names itself in ``package``.
"""

from __future__ import annotations

from typing import Any

from blockd import __version__

#: The qemu-storage-daemon release whose QMP behaviour blockd follows.
QEMU_COMPAT = (7, 2, 0)


def version_info() -> dict[str, Any]:
    major, minor, micro = QEMU_COMPAT
    # Declaration order, as QEMU builds it; the encoder orders the wire form.
    return {
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": f"blockd {__version__}",
    }
