"""Tests for securepub.core.tickets: issuing and single-use redemption of tickets."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterator

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from securepub.core.tickets import (
    REFUSAL_REASONS,
    ITicketStore,
    StoreUnavailable,
    Ticket,
    TicketRefused,
    normalize_ip,
)
from securepub.engines.memory.tickets import MemoryTicketStore

BASE64URL_43 = re.compile(r"[A-Za-z0-9_-]{43}")


def make_ticket(
    expires_at: float = 30.0,
    client_ip: str | None = None,
    user: str = "alice",
) -> Ticket:
    return Ticket(
        user=user,
        client_ip=client_ip,
        subscribe=("news.*",),
        publish=("chat.room1",),
        expires_at=expires_at,
    )


def counting_randbytes() -> Callable[[int], bytes]:
    """Deterministic, distinct 'random' bytes: 0, 1, 2, ... big-endian."""
    counter = iter(range(1 << 30))

    def randbytes(n: int) -> bytes:
        return next(counter).to_bytes(n, "big")

    return randbytes


def scripted_randbytes(chunks: list[bytes]) -> Callable[[int], bytes]:
    it: Iterator[bytes] = iter(chunks)

    def randbytes(n: int) -> bytes:
        return next(it)

    return randbytes


class StoreTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.store = MemoryTicketStore(self.clock)

    def issue(self, ticket: Ticket) -> str:
        token = self.successResultOf(self.store.issue(ticket))
        assert isinstance(token, str)
        return token

    def refused(self, token: str, peer_ip: str = "192.0.2.1") -> str:
        failure = self.failureResultOf(self.store.redeem(token, peer_ip), TicketRefused)
        reason = failure.value.reason
        assert isinstance(reason, str)
        return reason


class IssueTests(StoreTestCase):
    def test_provides_interface(self) -> None:
        """MemoryTicketStore fully provides ITicketStore."""
        self.assertTrue(verifyObject(ITicketStore, self.store))

    def test_tokens_are_distinct_base64url_of_256_bits(self) -> None:
        """Each issue yields a fresh 43-character unpadded base64url token of 32 bytes."""
        tokens = [self.issue(make_ticket()) for _ in range(200)]
        self.assertEqual(len(set(tokens)), len(tokens))
        for token in tokens:
            self.assertIsNotNone(BASE64URL_43.fullmatch(token), token)
            self.assertEqual(len(base64.urlsafe_b64decode(token + "=")), 32)
        self.assertEqual(self.store.size(), 200)

    def test_token_comes_from_injected_randomness(self) -> None:
        """The token is the base64url encoding of the injected random bytes."""
        raw = bytes(range(32))
        store = MemoryTicketStore(self.clock, randbytes=scripted_randbytes([raw]))
        token = self.successResultOf(store.issue(make_ticket()))
        self.assertEqual(token, base64.urlsafe_b64encode(raw).rstrip(b"=").decode())

    def test_colliding_randomness_is_retried(self) -> None:
        """A token that collides with a held entry is never handed out twice."""
        first, second = b"\x01" * 32, b"\x02" * 32
        store = MemoryTicketStore(
            self.clock, randbytes=scripted_randbytes([first, first, first, second])
        )
        token1 = self.successResultOf(store.issue(make_ticket(user="a")))
        token2 = self.successResultOf(store.issue(make_ticket(user="b")))
        self.assertNotEqual(token1, token2)
        self.assertEqual(self.successResultOf(store.redeem(token1, "192.0.2.1")).user, "a")
        self.assertEqual(self.successResultOf(store.redeem(token2, "192.0.2.1")).user, "b")

    def test_broken_randomness_is_unavailable(self) -> None:
        """A randomness source that keeps repeating itself or reads short fails the issue."""
        constant = MemoryTicketStore(self.clock, randbytes=lambda n: b"\x00" * n)
        self.successResultOf(constant.issue(make_ticket()))
        self.failureResultOf(constant.issue(make_ticket()), StoreUnavailable)
        self.assertEqual(constant.size(), 1)

        short = MemoryTicketStore(self.clock, randbytes=lambda n: b"\x00" * (n - 1))
        self.failureResultOf(short.issue(make_ticket()), StoreUnavailable)
        self.assertEqual(short.size(), 0)


class RedeemTests(StoreTestCase):
    def test_redeem_returns_the_ticket(self) -> None:
        """Redeeming a fresh token fires with the very Ticket that was issued."""
        ticket = make_ticket()
        token = self.issue(ticket)
        self.assertIs(self.successResultOf(self.store.redeem(token, "198.51.100.9")), ticket)

    def test_single_use(self) -> None:
        """A second redemption is 'already_redeemed' until expiry, then 'unknown'."""
        token = self.issue(make_ticket(expires_at=30.0))
        self.successResultOf(self.store.redeem(token, "192.0.2.1"))
        self.assertEqual(self.refused(token), "already_redeemed")
        self.clock.advance(29.999)
        self.assertEqual(self.refused(token), "already_redeemed")
        self.clock.advance(0.001)
        self.assertEqual(self.refused(token), "unknown")
        self.assertEqual(self.store.size(), 0)

    def test_just_before_expiry_is_accepted(self) -> None:
        """A ticket redeemed a millisecond before expires_at is accepted."""
        token = self.issue(make_ticket(expires_at=30.0))
        self.clock.advance(30.0 - 0.001)
        self.successResultOf(self.store.redeem(token, "192.0.2.1"))

    def test_at_the_deadline_is_expired(self) -> None:
        """At expires_at exactly the ticket is 'expired', consumed, and then 'unknown'."""
        token = self.issue(make_ticket(expires_at=30.0))
        self.clock.advance(30.0)
        self.assertEqual(self.refused(token), "expired")
        self.assertEqual(self.refused(token), "unknown")
        self.assertEqual(self.store.size(), 0)

    def test_expired_and_purged_is_unknown(self) -> None:
        """Once an issue has purged an expired ticket, redeeming it is 'unknown'."""
        token = self.issue(make_ticket(expires_at=30.0))
        self.clock.advance(31.0)
        self.issue(make_ticket(expires_at=100.0))
        self.assertEqual(self.refused(token), "unknown")

    def test_wrong_ip_burns_the_ticket(self) -> None:
        """A redemption from another IP fails 'wrong_ip' and burns the ticket for everyone."""
        token = self.issue(make_ticket(client_ip="203.0.113.7"))
        self.assertEqual(self.refused(token, "203.0.113.8"), "wrong_ip")
        self.assertEqual(self.refused(token, "203.0.113.7"), "already_redeemed")

    def test_unparseable_peer_is_wrong_ip(self) -> None:
        """A bound ticket presented with a peer that is not an IP fails 'wrong_ip' and burns."""
        token = self.issue(make_ticket(client_ip="203.0.113.7"))
        self.assertEqual(self.refused(token, "unix:/tmp/sock"), "wrong_ip")
        self.assertEqual(self.refused(token, "203.0.113.7"), "already_redeemed")

    def test_ipv4_mapped_peer_matches_ipv4_binding(self) -> None:
        """A dual-stack socket's ::ffff:a.b.c.d peer matches a ticket bound to a.b.c.d."""
        token = self.issue(make_ticket(client_ip="203.0.113.7"))
        self.successResultOf(self.store.redeem(token, "::ffff:203.0.113.7"))
        token = self.issue(make_ticket(client_ip="::FFFF:203.0.113.7"))
        self.successResultOf(self.store.redeem(token, "203.0.113.7"))

    def test_ipv6_spellings_match(self) -> None:
        """IPv6 binding and peer compare as addresses, not as strings."""
        token = self.issue(make_ticket(client_ip="2001:DB8:0:0::1"))
        self.successResultOf(self.store.redeem(token, "2001:db8::1"))

    def test_unbound_ticket_accepts_any_peer(self) -> None:
        """A ticket without client_ip is redeemable from any peer, even a non-IP one."""
        for peer in ["192.0.2.1", "2001:db8::1", "unix"]:
            token = self.issue(make_ticket())
            self.successResultOf(self.store.redeem(token, peer))

    def test_unknown_and_malformed_tokens(self) -> None:
        """Tokens never issued, or not shaped like one, are 'unknown' and change nothing."""
        live = self.issue(make_ticket())
        never_issued = base64.urlsafe_b64encode(b"\xff" * 32).rstrip(b"=").decode()
        for token in [
            never_issued,
            "",
            "A",
            "A" * 10240,
            "\u00e9" * 43,
            "A" * 42 + "\u00e9",
            "A" * 42 + "=",
            "A" * 42 + "+",
            "A" * 42 + "/",
            "A" * 42 + "\x00",
            live + "=",
            live + "\n",
            " " + live,
            live[:-1],
        ]:
            self.assertEqual(self.refused(token), "unknown", repr(token[:50]))
        self.successResultOf(self.store.redeem(live, "192.0.2.1"))

    def test_success_and_refusals_fire_synchronously(self) -> None:
        """The memory store fires its Deferreds at once (callers must also handle later)."""
        token = self.issue(make_ticket())
        results: list[object] = []
        self.store.redeem(token, "192.0.2.1").addBoth(results.append)
        self.store.redeem(token, "192.0.2.1").addBoth(results.append)
        self.assertIsInstance(results[0], Ticket)
        assert isinstance(results[1], Failure)
        self.assertIsInstance(results[1].value, TicketRefused)


class MemoryBoundTests(StoreTestCase):
    def test_flood_of_unredeemed_tickets_is_purged(self) -> None:
        """100000 unredeemed tickets are all dropped by the first issue after they expire."""
        store = MemoryTicketStore(self.clock, randbytes=counting_randbytes())
        for _ in range(100_000):
            store.issue(make_ticket(expires_at=30.0))
        self.assertEqual(store.size(), 100_000)
        self.clock.advance(30.5)
        self.successResultOf(store.issue(make_ticket(expires_at=60.5)))
        self.assertEqual(store.size(), 1)

    def test_tombstones_are_purged_at_expiry(self) -> None:
        """Tombstones of redeemed tickets are held only until the ticket's expiry."""
        tokens = [self.issue(make_ticket(expires_at=10.0 + i)) for i in range(5)]
        for token in tokens:
            self.successResultOf(self.store.redeem(token, "192.0.2.1"))
        self.assertEqual(self.store.size(), 5)
        self.clock.advance(12.0)
        self.assertEqual(self.store.purge(), 3)
        self.assertEqual(self.store.size(), 2)
        self.clock.advance(100.0)
        self.assertEqual(self.store.purge(), 2)
        self.assertEqual(self.store.purge(), 0)
        self.assertEqual(self.store.size(), 0)

    def test_redeem_purges_too(self) -> None:
        """A redemption purges expired entries, so redeems alone keep memory bounded."""
        for _ in range(10):
            self.issue(make_ticket(expires_at=5.0))
        self.clock.advance(5.0)
        self.refused("A" * 43)
        self.assertEqual(self.store.size(), 0)


class SecrecyTests(StoreTestCase):
    def test_token_never_in_exceptions(self) -> None:
        """No refusal's str, repr or traceback text contains the token."""
        token_expired = self.issue(make_ticket(expires_at=1.0))
        token_bound = self.issue(make_ticket(client_ip="192.0.2.1", expires_at=100.0))
        token_replay = self.issue(make_ticket(expires_at=100.0))
        self.successResultOf(self.store.redeem(token_replay, "192.0.2.1"))
        self.clock.advance(1.0)
        seen: set[str] = set()
        for token, peer in [
            (token_expired, "192.0.2.1"),
            (token_bound, "192.0.2.2"),
            (token_replay, "192.0.2.1"),
            ("B" * 43, "192.0.2.1"),
        ]:
            failure = self.failureResultOf(self.store.redeem(token, peer), TicketRefused)
            seen.add(failure.value.reason)
            for text in [
                str(failure.value),
                repr(failure.value),
                str(failure),
                failure.getTraceback(),
                repr(failure.value.args),
            ]:
                self.assertNotIn(token, text)
        self.assertEqual(seen, REFUSAL_REASONS)

    def test_store_holds_only_hashes(self) -> None:
        """The store keeps SHA-256 digests of tokens, never the tokens or their bytes."""
        token = self.issue(make_ticket(expires_at=100.0))
        redeemed = self.issue(make_ticket(expires_at=100.0))
        self.successResultOf(self.store.redeem(redeemed, "192.0.2.1"))
        dump = repr(vars(self.store)) + repr(self.store)
        for secret in [token, redeemed]:
            raw = base64.urlsafe_b64decode(secret + "=")
            self.assertNotIn(secret, dump)
            self.assertNotIn(repr(raw)[2:-1], dump)
        digest = hashlib.sha256(token.encode()).digest()
        self.assertIn(digest, vars(self.store)["_live"])
        self.assertIn(hashlib.sha256(redeemed.encode()).digest(), vars(self.store)["_tombstones"])

    def test_refusal_reasons_are_closed(self) -> None:
        """TicketRefused takes only the four documented reasons and prints just the reason."""
        self.assertEqual(str(TicketRefused("wrong_ip")), "ticket refused: wrong_ip")
        self.assertRaises(ValueError, TicketRefused, "because")


class TicketTests(SynchronousTestCase):
    def test_client_ip_is_normalized(self) -> None:
        """Ticket normalizes client_ip on construction and refuses non-addresses."""
        self.assertEqual(make_ticket(client_ip="::ffff:192.0.2.1").client_ip, "192.0.2.1")
        self.assertEqual(make_ticket(client_ip="2001:DB8::0:1").client_ip, "2001:db8::1")
        self.assertIsNone(make_ticket(client_ip=None).client_ip)
        self.assertRaises(ValueError, make_ticket, client_ip="example.com")

    def test_expiry_must_be_finite(self) -> None:
        """A NaN or infinite expires_at would never expire, so it is refused."""
        for bad in [float("nan"), float("inf"), float("-inf")]:
            self.assertRaises(ValueError, make_ticket, expires_at=bad)

    def test_grants_become_tuples(self) -> None:
        """Grant lists are frozen into tuples so the Ticket stays immutable."""
        ticket = Ticket("u", None, ["a"], ["b"], 1.0)  # type: ignore[arg-type]
        self.assertEqual((ticket.subscribe, ticket.publish), (("a",), ("b",)))


class NormalizeIpTests(SynchronousTestCase):
    def test_table(self) -> None:
        """normalize_ip canonicalizes addresses and maps IPv4-mapped IPv6 to IPv4."""
        for raw, expected in [
            ("192.0.2.1", "192.0.2.1"),
            ("::ffff:192.0.2.1", "192.0.2.1"),
            ("::FFFF:c000:0201", "192.0.2.1"),
            ("2001:0db8:0000::0001", "2001:db8::1"),
            ("::1", "::1"),
            ("::", "::"),
            ("::192.0.2.1", "::c000:201"),
        ]:
            self.assertEqual(normalize_ip(raw), expected, raw)

    def test_rejects(self) -> None:
        """Non-addresses, zoned IPv6, padded or leading-zero forms raise ValueError."""
        for raw in [
            "",
            "localhost",
            "192.0.2.01",
            "192.0.2",
            " 192.0.2.1",
            "192.0.2.1\n",
            "fe80::1%eth0",
            "[::1]",
            "192.0.2.1:443",
            "\u0661.0.0.1",
        ]:
            self.assertRaises(ValueError, normalize_ip, raw)

    @given(st.ip_addresses())
    def test_fixed_point(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        """Normalizing is idempotent, and the result denotes the same host."""
        once = normalize_ip(str(address))
        self.assertEqual(normalize_ip(once), once)
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            self.assertEqual(once, str(address.ipv4_mapped))
        else:
            self.assertEqual(ipaddress.ip_address(once), address)


class RevokeUserTests(SynchronousTestCase):
    def test_revoke_user_burns_only_that_users_tickets(self) -> None:
        """Revoked tickets are refused; other users' tickets still work."""
        from twisted.internet.task import Clock

        from securepub.core.tickets import Ticket, TicketRefused
        from securepub.engines.memory.tickets import MemoryTicketStore

        clock = Clock()
        store = MemoryTicketStore(clock)
        alice = [store.issue(Ticket("alice", None, (), (), 30.0)).result for _ in range(2)]
        bob = store.issue(Ticket("bob", None, (), (), 30.0)).result
        self.assertEqual(self.successResultOf(store.revoke_user("alice")), 2)
        for token in alice:
            self.failureResultOf(store.redeem(token, "192.0.2.1"), TicketRefused)
        self.assertEqual(self.successResultOf(store.redeem(bob, "192.0.2.1")).user, "bob")
        self.assertEqual(self.successResultOf(store.revoke_user("alice")), 0)
