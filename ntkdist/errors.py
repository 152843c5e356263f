"""One exception family for everything a user can get wrong.

The CLI turns any :class:`NtkdistError` into one line on stderr and exit code 2; each
message says what was wrong and, where it helps, what to do.
"""


class NtkdistError(Exception):
    """Base class of every user-facing error of ntkdist."""


class InputError(NtkdistError):
    """The data (a file, an array, a generator's parameters) cannot be used."""


class SpecError(NtkdistError):
    """The run description is inconsistent or out of range."""


class OutputError(NtkdistError):
    """The output location exists and belongs to something else, or cannot be written."""
