"""Tests for securepub.core.origin: Origin normalization and the handshake's Origin policy."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from securepub.core.errors import ConfigError
from securepub.core.origin import OriginDecision, OriginPolicy, normalize_origin

NORMALIZED = [
    ("https://example.com", "https://example.com:443"),
    ("https://Example.COM", "https://example.com:443"),
    ("HTTPS://EXAMPLE.COM", "https://example.com:443"),
    ("https://example.com:443", "https://example.com:443"),
    ("https://example.com:8443", "https://example.com:8443"),
    ("https://example.com:08443", "https://example.com:8443"),
    ("http://example.com", "http://example.com:80"),
    ("http://x:80", "http://x:80"),
    ("http://example.com:443", "http://example.com:443"),
    ("https://localhost:8443", "https://localhost:8443"),
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("https://sub_domain.example-1.com", "https://sub_domain.example-1.com:443"),
    ("https://xn--bcher-kva.example", "https://xn--bcher-kva.example:443"),
    ("https://example.com.", "https://example.com.:443"),
    ("https://[::1]", "https://[::1]:443"),
    ("https://[::1]:8443", "https://[::1]:8443"),
    ("https://[2001:DB8:0:0::1]", "https://[2001:db8::1]:443"),
    ("http://[2001:db8::1]:80", "http://[2001:db8::1]:80"),
]

MALFORMED = [
    "null",
    "NULL",
    "",
    " ",
    "example.com",
    "//example.com",
    "https://",
    "https://:443",
    "https:example.com",
    "https:/example.com",
    "https://example.com/",
    "https://example.com/app",
    "https://example.com?x=1",
    "https://example.com#top",
    "https://user@example.com",
    "https://user:pw@example.com",
    "https://example.com:",
    "https://example.com:0",
    "https://example.com:65536",
    "https://example.com:123456",
    "https://example.com:-1",
    "https://example.com:https",
    "https://example.com:443:443",
    "https://exa mple.com",
    " https://example.com",
    "https://example.com ",
    "https://example.com\r\n",
    "https://example.com\x00",
    "https://ex%61mple.com",
    "https://example..com",
    "https://.example.com",
    "https://" + "a" * 64 + ".com",
    "https://" + "a." * 127 + "com",
    "https://b\u00fccher.example",
    "https://\u0435xample.com",
    "https://example.com\\evil",
    "https://1.2.3.999",
    "https://127.1",
    "https://0x7f.0.0.1",
    "https://1.2.3.4.",
    "https://example.123",
    "https://[::1",
    "https://::1",
    "https://[::1]x",
    "https://[fe80::1%25eth0]",
    "https://[not:an:ip]",
    "https://[1.2.3.4]",
    "wss://example.com",
    "ws://example.com",
    "ftp://example.com",
    "file://",
    "chrome-extension://abcdefghijklmnop",
    "javascript://example.com",
    "https://example.com, https://example.org",
    "https://example.com" + "m" * 2000,
]


class NormalizeOriginTests(SynchronousTestCase):
    def test_normalization_table(self) -> None:
        """Scheme and host are lowercased and the default port made explicit."""
        for raw, expected in NORMALIZED:
            self.assertEqual(normalize_origin(raw), expected, raw)

    def test_malformed_table(self) -> None:
        """null, paths (even "/"), userinfo, query, fragment, bad ports, other schemes,
        non-ASCII hosts and odd IPv4 spellings are all None.

        Browsers serialize an origin as scheme://host[:port] with nothing after
        it, so anything else is not an origin a browser sent.
        """
        for raw in MALFORMED:
            self.assertIsNone(normalize_origin(raw), raw)

    def test_default_port_is_explicit(self) -> None:
        """An origin with and without its scheme's default port normalize to the same value."""
        self.assertEqual(
            normalize_origin("https://app.example.com"),
            normalize_origin("https://app.example.com:443"),
        )
        self.assertNotEqual(
            normalize_origin("https://app.example.com"),
            normalize_origin("http://app.example.com"),
        )
        self.assertNotEqual(
            normalize_origin("https://app.example.com"),
            normalize_origin("https://app.example.com:8443"),
        )

    @given(st.text(max_size=80))
    def test_normalized_is_fixed_point(self, text: str) -> None:
        """Whatever normalizes once normalizes to itself again."""
        once = normalize_origin(text)
        if once is not None:
            self.assertEqual(normalize_origin(once), once)

    @given(
        st.sampled_from(["http", "https", "HTTP", "Https"]),
        st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True),
        st.one_of(st.none(), st.integers(min_value=1, max_value=65535)),
    )
    def test_generated_origins(self, scheme: str, host: str, port: int | None) -> None:
        """Generated scheme://host[:port] origins normalize to lowercase with a port."""
        raw = f"{scheme}://{host.upper()}" + ("" if port is None else f":{port}")
        expected_port = port if port is not None else {"http": 80, "https": 443}[scheme.lower()]
        self.assertEqual(normalize_origin(raw), f"{scheme.lower()}://{host}:{expected_port}")


class EnforcePolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = OriginPolicy(["https://app.example.com", "http://localhost:8080"], True)

    def test_no_origin_is_allowed(self) -> None:
        """A handshake without Origin (a non-browser client) passes the Origin check."""
        self.assertEqual(
            self.policy.check(None), OriginDecision(allowed=True, origin=None, reason="no_origin")
        )

    def test_listed_origin_is_allowed(self) -> None:
        """An Origin equal to a configured one after normalization is allowed."""
        for header in ["https://app.example.com", "https://APP.example.com:443"]:
            self.assertEqual(
                self.policy.check(header),
                OriginDecision(allowed=True, origin=header, reason="allowed"),
            )
        self.assertTrue(self.policy.check("http://localhost:8080").allowed)

    def test_unlisted_origin_is_refused(self) -> None:
        """Another scheme, host or port than a configured origin is refused as not_allowed."""
        for header in [
            "https://evil.example.com",
            "http://app.example.com",
            "https://app.example.com:8443",
            "https://app.example.com.evil.com",
            "http://localhost",
        ]:
            self.assertEqual(
                self.policy.check(header),
                OriginDecision(allowed=False, origin=header, reason="not_allowed"),
            )

    def test_null_and_garbage_are_malformed(self) -> None:
        """The opaque origin "null", an empty header and garbage are refused as malformed."""
        for header in ["null", "", "https://app.example.com/", "app.example.com"]:
            self.assertEqual(
                self.policy.check(header),
                OriginDecision(allowed=False, origin=header, reason="malformed"),
            )

    def test_logged_origin_is_truncated(self) -> None:
        """A decision keeps at most 200 characters of the raw header for the log."""
        header = "https://" + "x" * 5000
        decision = self.policy.check(header)
        self.assertEqual(decision.origin, header[:200])
        self.assertFalse(decision.allowed)

    def test_allows_nothing(self) -> None:
        """Enforcing with an empty list refuses every Origin but still passes no Origin."""
        policy = OriginPolicy([], enforce=True)
        self.assertTrue(policy.allows_nothing)
        self.assertFalse(policy.check("https://localhost:8443").allowed)
        self.assertTrue(policy.check(None).allowed)
        self.assertFalse(self.policy.allows_nothing)
        self.assertFalse(OriginPolicy([], enforce=False).allows_nothing)

    def test_properties(self) -> None:
        """The policy exposes its mode and the normalized configured origins."""
        self.assertTrue(self.policy.enforce)
        self.assertEqual(
            self.policy.allowed_origins,
            frozenset({"https://app.example.com:443", "http://localhost:8080"}),
        )


class LogPolicyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.policy = OriginPolicy(["https://app.example.com"], enforce=False)

    def test_log_mode_allows_everything(self) -> None:
        """In log mode every request passes; would-be refusals say log_only."""
        cases = [
            (None, "no_origin"),
            ("https://app.example.com", "allowed"),
            ("https://evil.example.com", "log_only"),
            ("null", "log_only"),
            ("garbage", "log_only"),
        ]
        for header, reason in cases:
            self.assertEqual(
                self.policy.check(header),
                OriginDecision(allowed=True, origin=header, reason=reason),
            )


class ConfigTests(SynchronousTestCase):
    def test_bad_configured_origin_is_config_error(self) -> None:
        """A configured origin that does not normalize stops the start, naming it."""
        for bad in ["https://app.example.com/", "app.example.com", "null", "wss://x"]:
            with self.assertRaises(ConfigError) as raised:
                OriginPolicy(["https://ok.example.com", bad], enforce=True)
            self.assertIn(repr(bad), str(raised.exception))
            self.assertIn("allowed_origins", str(raised.exception))

    def test_single_string_is_config_error(self) -> None:
        """A bare string instead of a list is refused rather than iterated per character."""
        self.assertRaises(ConfigError, OriginPolicy, "https://app.example.com", True)

    def test_configured_origins_are_normalized(self) -> None:
        """Configured origins are compared after normalization too."""
        policy = OriginPolicy(["HTTPS://App.Example.com:443"], enforce=True)
        self.assertTrue(policy.check("https://app.example.com").allowed)
