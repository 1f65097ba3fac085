"""Errors shared across the package's layers."""
from __future__ import annotations

__all__ = ["BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """The backend's library (or device) is missing on this machine; the message says how to install it."""
