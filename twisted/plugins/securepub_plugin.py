"""twistd dropin: makes ``twistd securepub`` available; imports none of the app."""

from twisted.application.service import ServiceMaker

securepub = ServiceMaker(
    "securepub",
    "securepub.tap",
    "A secure publish/subscribe server: TLS-only, ticket-authenticated WebSockets.",
    "securepub",
)
