"""The project's user errors, and how to find one inside whatever Ray wrapped it in.

A user mistake (a bad config, dataset row or model path) is printed by the ``t3s`` command as one
``t3s: error:`` line, wherever it was raised; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import re


class ConfigError(ValueError):
    """A configuration problem, with the key path and file it concerns."""


class DataError(ValueError):
    """A dataset problem; the message names the source and the offending rows or columns."""


class ModelRefError(ValueError):
    """A model ref that cannot be resolved or loaded; the message names the ref."""


# Problems caused by the user's input: printed as one clear line, never as a traceback.
USER_ERRORS = (ConfigError, DataError, ModelRefError, FileNotFoundError)
_USER_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?(?:ConfigError|DataError|ModelRefError|FileNotFoundError): (.+)$", re.M)


def user_error(error: BaseException) -> str | None:
    """The message of the project's own error inside whatever Ray wrapped it in, or None (a bug,
    whose traceback is worth showing). Ray hands a driver an error raised in a task or actor as a
    ``RayTaskError`` (its ``cause`` is the original), Ray Train as a ``WorkerGroupError`` (one failure
    per worker rank), Ray Data and Tune chain them; an actor that died in ``__init__`` leaves only
    the text of its error, read as a last resort."""
    stack, seen, texts = [error], set(), []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        # RayTaskError(ModelRefError) subclasses the cause's class, but its str() is the traceback.
        from_ray = type(e).__module__.startswith("ray.")
        if isinstance(e, USER_ERRORS) and not from_ray:
            return str(e)
        if from_ray:
            texts.append(str(e))
        stack += [getattr(e, "cause", None), e.__cause__, e.__context__]
        stack += [f for f in (getattr(e, "worker_failures", None) or {}).values() if isinstance(f, BaseException)]
    for text in texts:
        found = _USER_ERROR_LINE.findall(text)
        if found:
            return found[-1]
    return None


class _HideUserErrorTracebacks(logging.Filter):
    """On Ray Data's console handler: drop the "Full stack trace" of a failure that is a user error
    (an engine actor that could not load its model dies in ``__init__``, which Ray Data classes as a
    system error and prints in full), since the ``t3s`` command prints its one line. The log file
    keeps everything; a real bug's trace still reaches the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return error is None or user_error(error) is None


def quiet_user_error_tracebacks() -> None:
    """Install :class:`_HideUserErrorTracebacks` on Ray Data's console handlers (once)."""
    import ray.data  # noqa: F401  (configures its loggers)

    for handler in logging.getLogger("ray.data").handlers:
        if not getattr(handler, "baseFilename", None) and not any(
                isinstance(f, _HideUserErrorTracebacks) for f in handler.filters):
            handler.addFilter(_HideUserErrorTracebacks())
