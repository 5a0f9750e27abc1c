"""The one map from the project's errors to gRPC status codes, applied to every servicer method."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar, cast

import grpc

from pf2lora.common.errors import (
    AlreadyExists,
    ConfigError,
    DataError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    bounded,
)

logger = logging.getLogger(__name__)

# Order matters only for subclasses; these are unrelated classes.
STATUS_OF: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),  # a bad run configuration in StartRun
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
    # damaged or missing files on the coordinator's side: DATA_LOSS names the file to restore
    (DataError, grpc.StatusCode.DATA_LOSS),
)

F = TypeVar("F", bound=Callable[..., Any])


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            level = logging.ERROR if code == grpc.StatusCode.DATA_LOSS else logging.WARNING
            message = bounded(str(exc))
            logger.log(level, "%s from %s: %s: %s", method, context.peer(), code.name, message)
            context.abort(code, message)
    logger.exception("%s from %s failed unexpectedly", method, context.peer())
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def map_errors(fn: F) -> F:
    """Decorate a servicer method `(self, request, context)`; works for response streams too."""
    method = fn.__name__
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped or reported as INTERNAL
                if _is_abort(exc):
                    raise
                _abort(context, exc, method)

        return cast(F, gen_wrapper)

    @functools.wraps(fn)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc):
                raise
            _abort(context, exc, method)

    return cast(F, wrapper)


def _is_abort(exc: BaseException) -> bool:
    # context.abort() raises a bare `Exception()` after recording the status: let it through.
    return type(exc) is Exception and not exc.args
