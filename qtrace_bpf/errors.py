"""One error type for user-facing failures: the CLI prints its message, never a traceback."""


class QtraceError(Exception):
    """A failure the user can act on (bad pid, missing symbol, no kernel hook...)."""

    exit_code = 2


class ElfError(QtraceError):
    """A binary that cannot be read as the ELF we need (non-ELF, truncated, wrong arch...)."""


class AttachError(QtraceError):
    """A binary or process that could not be traced; `reason` labels the self-metric
    (vanished: the process or file went away meanwhile; unusable_binary; attach_failed)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason
