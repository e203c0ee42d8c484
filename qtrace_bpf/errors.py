"""One error type for user-facing failures: the CLI prints its message, never a traceback."""


class QtraceError(Exception):
    """A failure the user can act on (bad pid, missing symbol, no kernel hook...)."""

    exit_code = 2


class ElfError(QtraceError):
    """A binary that cannot be read as the ELF we need (non-ELF, truncated, wrong arch...)."""
