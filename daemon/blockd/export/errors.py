"""The NBD error a failure is reported as: the one place NBD's replies map failures.

QMP's mapping lives with the exceptions (:mod:`blockd.errors`); this is
NBD's, beside its protocol.
"""

from __future__ import annotations

import errno as errno_module

from blockd.errors import BlockIOError, ReadOnlyError
from blockd.export import protocol as p

_ERRNO_TO_NBD = {
    errno_module.EPERM: p.EPERM,
    errno_module.EROFS: p.EPERM,
    errno_module.EIO: p.EIO,
    errno_module.ENOMEM: p.ENOMEM,
    errno_module.ENOSPC: p.ENOSPC,
    errno_module.EDQUOT: p.ENOSPC,
    errno_module.EFBIG: p.ENOSPC,
    errno_module.EOVERFLOW: p.EOVERFLOW,
    errno_module.ENOTSUP: p.ENOTSUP,
    errno_module.EOPNOTSUPP: p.ENOTSUP,
    errno_module.ESHUTDOWN: p.ESHUTDOWN,
    errno_module.EINVAL: p.EINVAL,
}


def nbd_error(err: BaseException) -> int:
    """The NBD error value for a failure, by its type and errno: QEMU maps an
    unknown errno to EINVAL, and a write its permissions refuse to EPERM."""
    if isinstance(err, BlockIOError):
        return _ERRNO_TO_NBD.get(err.errno, p.EINVAL)
    if isinstance(err, OSError) and err.errno is not None:
        return _ERRNO_TO_NBD.get(err.errno, p.EINVAL)
    if isinstance(err, ReadOnlyError):
        return p.EPERM
    return p.EIO
