"""The project's own exception types (servicers and the CLI map each to one status or exit
code), and `bounded`, how any message quotes client input.
"""

from __future__ import annotations


class Pf2LoraError(Exception):
    """Base of every error pf2lora raises on purpose. The message says what to do."""


class ConfigError(Pf2LoraError, ValueError):
    """A configuration field has a bad value; the message names the field and the value."""


class DataError(Pf2LoraError, ValueError):
    """Input data is unusable; the message names the file and the column."""


class InvalidArgument(Pf2LoraError):
    """A request is malformed (bad tensor name, shape, dtype, digest, non-finite value)."""


class FailedPrecondition(Pf2LoraError):
    """A request does not fit the current state (wrong or stale round, no active run)."""


class PermissionDenied(Pf2LoraError):
    """The caller is not allowed (unknown silo, identity mismatch, wrong certificate role)."""


class NotFound(Pf2LoraError):
    """The named object (run, silo, checkpoint) does not exist."""


class AlreadyExists(Pf2LoraError):
    """What the request would create exists and is in use (a second live session of a silo)."""


# Status details and log lines echo client input: bounded, so a 4 MB field neither floods the
# log nor exceeds a gRPC client's metadata limit (which would replace the real status).
MAX_ECHO = 1000


def bounded(text: str, limit: int = MAX_ECHO) -> str:
    """`text`, cut to `limit` characters with its full length said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"
