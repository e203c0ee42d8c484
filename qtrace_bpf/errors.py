"""One error type for user-facing failures: the CLI prints its message, never a traceback;
and which OS errors mean "out of a resource" rather than a fault."""

import errno

# Out of fds, memory or socket buffers: counted and retried by the daemon and the HTTP
# server, never fatal (the next turn of the loop or the next accept may have room).
RESOURCE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


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
