"""The one error type for input a caller must fix."""

from __future__ import annotations


class InputError(ValueError):
    """A request the caller must fix; served as INVALID_ARGUMENT with this message.

    Messages name the input and the limit, never the request's data (no PHI in errors or logs).
    """
