"""psa_jax's own errors: what a user gave is wrong, and the message says which file, key or row.

Every stage's named errors derive from :class:`PsaJaxError` (besides the builtin they always
were, so ``except ValueError`` keeps working). The command line prints such an error as one
line and exits with :data:`EXIT_BAD_INPUT`; any other exception is a bug or an environment
failure and keeps its traceback.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class PsaJaxError(Exception):
    """Bad input, named: the message alone tells the user what to fix."""


class UsageError(PsaJaxError, ValueError):
    """Command-line flags that do not fit together (e.g. both or neither of two choices)."""
