"""One exception family for everything a user can get wrong.

The CLI turns any :class:`NtkdistError` into one line on stderr and exit code 2; each
message says what was wrong and, where it helps, what to do.
"""

import errno
import os


class NtkdistError(Exception):
    """Base class of every user-facing error of ntkdist."""


class InputError(NtkdistError, ValueError):
    """The data (a file, an array, a generator's parameters) cannot be used.

    Also a ValueError, so that code written against NumPy-style argument checking keeps
    catching it.
    """


class SpecError(NtkdistError, ValueError):
    """The run description (depth, kernel, normalisation, …) is inconsistent or out of range.

    Also a ValueError, for the same reason as :class:`InputError`.
    """


class OutputError(NtkdistError):
    """The output location exists and belongs to something else, or cannot be written."""


def os_reason(exc: OSError) -> str:
    """An OS error in words, lower case, with its errno name: 'no space left on device
    (ENOSPC)'; for a full disk, a read-only file system, missing permissions and the like."""
    code = getattr(exc, "errno", None)
    if isinstance(code, int) and code in errno.errorcode:
        words = os.strerror(code)
        return f"{words[:1].lower()}{words[1:]} ({errno.errorcode[code]})"
    return f"{type(exc).__name__}: {exc}"
