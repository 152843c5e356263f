"""One exception family for everything a user can get wrong.

The CLI turns any :class:`NtkdistError` into one line on stderr and exit code 2; each
message says what was wrong and, where it helps, what to do.
"""


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
