"""Exceptions shared across securepub's modules."""

from __future__ import annotations


class ConfigError(Exception):
    """A setting is missing or wrong; the message names it in one line."""


class RequestError(Exception):
    """A client's request is refused with one of the SPEC's error codes.

    ``code`` is the stable machine-readable code (``bad_request``,
    ``invalid_topic``, ``forbidden``, ``invalid_payload``, ...); ``message``
    is human text. Neither ever contains a secret.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"
