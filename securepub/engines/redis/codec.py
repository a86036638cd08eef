"""How a publication is written into Redis, and checked again when it comes back.

Everything read from Redis is untrusted: anyone who can write to Redis can put
anything there. Every field is checked before it can reach a browser, and with
a cluster secret only correctly signed messages are accepted.
"""

from __future__ import annotations

import math
import re
from typing import Final

from securepub.core import jsonstrict
from securepub.core.errors import RequestError
from securepub.core.history import EPOCH_SHAPE, Publication
from securepub.core.topics import validate_topic
from securepub.engines.redis.signing import ClusterSigner

#: First line of every message: the format's version, which says whether a
#: signature line follows.
UNSIGNED: Final = "1"
SIGNED: Final = "2"
#: The "topic" of a control message closing a user's sessions on every node;
#: no real topic can take this name (``!`` is outside the topic grammar).
DISCONNECT: Final = "!disconnect"
#: Control messages announcing a user's first session on a topic, and its last.
JOIN: Final = "!join"
LEAVE: Final = "!leave"
CONTROLS: Final = frozenset({DISCONNECT, JOIN, LEAVE})
#: A live message of a history topic starts with this line, written by the
#: publish script: ``H <offset> <epoch>``.
HISTORY_PREFIX: Final = "H "

MESSAGE_ID: Final = re.compile(r"([A-Za-z0-9_]{1,32})-([0-9]{1,20})")
_OFFSET: Final = re.compile(r"[1-9][0-9]{0,15}")


class Malformed(Exception):
    """A message from Redis failed a check; ``str()`` says which, for the log."""


class Codec:
    """Encodes publications for Redis and decodes (and checks) what Redis returns."""

    def __init__(self, max_body_bytes: int, signer: ClusterSigner | None = None) -> None:
        self._max_body_bytes = max_body_bytes
        self.signer = signer

    def encode(self, topic: str, message_id: str, ts: float, body: str) -> str:
        """A version line, a signature line if signed, then topic, id, timestamp, body."""
        text = f"{topic}\n{message_id}\n{ts!r}\n{body}"
        if self.signer is None:
            return f"{UNSIGNED}\n{text}"
        return f"{SIGNED}\n{self.signer.sign(text)}\n{text}"

    def decode(self, message: object, controls: bool = False) -> Publication:
        """Check one encoded message; raise `Malformed` saying what is wrong.

        ``controls`` admits the control topics (`CONTROLS`; live channel only).
        """
        if not isinstance(message, str):
            raise Malformed("not text")
        version, _, rest = message.partition("\n")
        if self.signer is not None:
            signature, _, rest = rest.partition("\n")
            if version != SIGNED:
                raise Malformed("unsigned")
            if not self.signer.verify(rest, signature):
                raise Malformed("bad signature")
        elif version != UNSIGNED:
            raise Malformed("signed, but this node has no cluster secret")
        parts = rest.split("\n", 3)
        if len(parts) != 4:
            raise Malformed("not in the expected format")
        topic, message_id, ts_text, body = parts
        if not (controls and topic in CONTROLS):
            try:
                validate_topic(topic)
            except RequestError:
                raise Malformed("bad topic") from None
        if MESSAGE_ID.fullmatch(message_id) is None:
            raise Malformed("bad message id")
        try:
            ts = float(ts_text)
        except ValueError:
            raise Malformed("bad timestamp") from None
        if not math.isfinite(ts):
            raise Malformed("bad timestamp")
        if len(body) > self._max_body_bytes:
            raise Malformed("body over the size limit")
        try:
            jsonstrict.loads(body)
        except RequestError:
            raise Malformed("body is not strict JSON") from None
        return Publication(topic, message_id, ts, body)


def split_history_prefix(message: str) -> tuple[int | None, str | None, str]:
    """``(offset, epoch, rest)`` of a live message; ``(None, None, message)`` without prefix."""
    if not message.startswith(HISTORY_PREFIX):
        return None, None, message
    header, _, rest = message.partition("\n")
    fields = header.split(" ")
    if len(fields) != 3 or _OFFSET.fullmatch(fields[1]) is None:
        raise Malformed("bad history header")
    if EPOCH_SHAPE.fullmatch(fields[2]) is None:
        raise Malformed("bad epoch")
    return int(fields[1]), fields[2], rest


def parse_offset(entry_id: object) -> int:
    """The offset a history entry's stream id ``<offset>-1`` carries."""
    if not isinstance(entry_id, str):
        raise Malformed("bad entry id")
    offset, dash, sequence = entry_id.partition("-")
    if not dash or sequence != "1" or _OFFSET.fullmatch(offset) is None:
        raise Malformed("bad entry id")
    return int(offset)


def presence_body(topic: str, user: str) -> str:
    """The body of a join or leave control message."""
    return jsonstrict.dumps({"topic": topic, "user": user})


def parse_presence_body(body: str) -> tuple[str, str]:
    """``(topic, user)`` of a join or leave message; ValueError if it is not one."""
    value = jsonstrict.loads(body)
    if not isinstance(value, dict) or set(value) != {"topic", "user"}:
        raise ValueError("not a presence body")
    topic, user = value["topic"], value["user"]
    if not isinstance(topic, str) or not isinstance(user, str) or not user:
        raise ValueError("not a presence body")
    if len(user.encode("utf-8")) > 255:
        raise ValueError("user name too long")
    return topic, user
