"""The frames the broker itself writes: messages, and subscriptions it ends."""

from __future__ import annotations

from collections.abc import Iterator

from securepub.core import jsonstrict
from securepub.core.history import HistoryPage, Publication


def message_frame(publication: Publication) -> bytes:
    """``{"op":"message",...}`` for one publication, offset and epoch last when it has them.

    ``topic``, ``id`` and ``epoch`` come from our own grammars (no character
    needs escaping, but they are escaped anyway), ``body`` is compact JSON
    from the validator or re-validated from the engine.
    """
    frame = (
        '{"op":"message","topic":'
        + jsonstrict.dumps(publication.topic)
        + ',"id":'
        + jsonstrict.dumps(publication.id)
        + ',"ts":'
        + repr(publication.ts)
        + ',"data":'
        + publication.body
    )
    if publication.offset is not None:
        frame += (
            ',"offset":'
            + str(publication.offset)
            + ',"epoch":'
            + jsonstrict.dumps(publication.epoch)
        )
    return (frame + "}").encode("utf-8")


def unsubscribed_frame(topic: str, reason: str) -> bytes:
    """``{"op":"unsubscribed",...}``: a subscription the server ended (SPEC section 9)."""
    return jsonstrict.dumps({"op": "unsubscribed", "topic": topic, "reason": reason}).encode()


def history_frames(page: HistoryPage) -> Iterator[bytes]:
    """Each publication of a page as the frame a subscriber got (``GET /v1/history``)."""
    return (message_frame(publication) for publication in page.publications)
