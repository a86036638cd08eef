"""Minimal WebSocket framing for driving the server protocol over StringTransport."""

from __future__ import annotations

import os
import struct

HANDSHAKE_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def handshake(
    path: str = "/ws",
    protocols: list[str] | None = None,
    origin: str | None = None,
    extra: dict[str, str] | None = None,
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: localhost:8443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {HANDSHAKE_KEY}",
        "Sec-WebSocket-Version: 13",
        "User-Agent: test-agent/1.0",
    ]
    if protocols:
        lines.append("Sec-WebSocket-Protocol: " + ", ".join(protocols))
    if origin is not None:
        lines.append(f"Origin: {origin}")
    for name, value in (extra or {}).items():
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def client_frame(payload: bytes, opcode: int = 1, fin: bool = True) -> bytes:
    """A masked client frame (RFC 6455 section 5.2)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


def server_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Split unmasked server frames into (opcode, payload); stops at a partial frame."""
    frames = []
    i = 0
    while i + 2 <= len(data):
        opcode = data[i] & 0x0F
        n = data[i + 1] & 0x7F
        j = i + 2
        if n == 126:
            (n,) = struct.unpack("!H", data[j : j + 2])
            j += 2
        elif n == 127:
            (n,) = struct.unpack("!Q", data[j : j + 8])
            j += 8
        if j + n > len(data):
            break
        frames.append((opcode, data[j : j + n]))
        i = j + n
    return frames


def split_response(data: bytes) -> tuple[bytes, bytes]:
    """The HTTP head of the handshake response and the frame bytes after it."""
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest
