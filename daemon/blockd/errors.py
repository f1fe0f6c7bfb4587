"""The exceptions blockd raises, and the QMP error class each one becomes.

Every layer raises these; only the QMP dispatcher turns them into QMP
responses, by the classes below, and the NBD server into NBD errors, by
type and errno (:mod:`blockd.export.errors`)::

    BlockdError                 GenericError, unless a subclass says otherwise
     +-- CommandNotFound        CommandNotFound: unknown command, or the wrong
     |                          phase of capabilities negotiation
     +-- DeviceNotFound         DeviceNotFound: a command's ``device`` names
     |                          no node (libvirt probes for this class)
     +-- DeviceNotActive        DeviceNotActive: a ``block-job-*`` command
     |                          names no job
     +-- InvalidArgument        arguments that failed schema validation; raised
     |                          before any handler runs, so nothing changed
     +-- BlockError             the block layer (images, nodes, I/O)
          +-- ImageError        an image that cannot be opened as asked:
          |                     corrupt, unsupported, or locked by another process
          +-- ReadOnlyError     a change asked of a node opened read-only
          +-- BlockIOError      a read or write failed; carries errno so job
                                ``on-error`` policies can tell ENOSPC from EIO

``str(error)`` is the ``desc`` a client reads; texts follow what
qemu-storage-daemon 7.2 says in the same situation.
"""

from __future__ import annotations

import enum
import errno as errno_module
import os
from typing import ClassVar


class ErrorClass(enum.StrEnum):
    """QMP's error classes (QAPI ``QapiErrorClass``) that blockd produces."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"


class BlockdError(Exception):
    """Base of every failure a client may be told about."""

    error_class: ClassVar[ErrorClass] = ErrorClass.GENERIC

    @property
    def desc(self) -> str:
        return str(self)


class CommandNotFound(BlockdError):
    error_class = ErrorClass.COMMAND_NOT_FOUND


class DeviceNotFound(BlockdError):
    error_class = ErrorClass.DEVICE_NOT_FOUND


class DeviceNotActive(BlockdError):
    error_class = ErrorClass.DEVICE_NOT_ACTIVE


class InvalidArgument(BlockdError):
    pass


class BlockError(BlockdError):
    pass


class ImageError(BlockError):
    pass


class ReadOnlyError(BlockError):
    pass


class BlockIOError(BlockError):
    """An I/O failure, worded as QEMU words errno (``strerror``)."""

    def __init__(self, errno: int, message: str | None = None) -> None:
        super().__init__(message if message is not None else os.strerror(errno))
        self.errno = errno

    @property
    def is_nospace(self) -> bool:
        return self.errno == errno_module.ENOSPC
