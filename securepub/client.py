"""The public import path of the blocking publisher (`securepub.clients.blocking`)."""

from securepub.clients.blocking import (
    DEFAULT_RETRY,
    DEFAULT_URL,
    MAX_RETRY_AFTER,
    APIError,
    CertificateError,
    ClientError,
    ConnectionFailed,
    HistoryPage,
    IssuedTicket,
    Published,
    Publisher,
    RetryPolicy,
    ServerURL,
)

__all__ = [
    "DEFAULT_RETRY",
    "DEFAULT_URL",
    "MAX_RETRY_AFTER",
    "APIError",
    "CertificateError",
    "ClientError",
    "ConnectionFailed",
    "HistoryPage",
    "IssuedTicket",
    "Published",
    "Publisher",
    "RetryPolicy",
    "ServerURL",
]
