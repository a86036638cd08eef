"""Client addresses behind trusted proxies: rightmost untrusted hop, spoofing ignored."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from securepub.core.clientip import ClientAddress, ProxyPolicy
from securepub.core.errors import ConfigError

POLICY = ProxyPolicy(["10.0.0.0/8", "2001:db8:ffff::/48"])


class ProxyPolicyTests(SynchronousTestCase):
    def test_untrusted_peer_headers_ignored(self) -> None:
        """A peer that is not a trusted proxy is the client, whatever it claims."""
        self.assertEqual(
            POLICY.client("203.0.113.7", [], ["198.51.100.1"]),
            ClientAddress("203.0.113.7", ignored_headers=True),
        )
        self.assertEqual(POLICY.client("203.0.113.7", [], []), ClientAddress("203.0.113.7"))

    def test_rightmost_untrusted_hop(self) -> None:
        """Through trusted proxies, the client is the rightmost untrusted address."""
        cases = [
            (["198.51.100.1"], "198.51.100.1"),
            (["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client wrote 6.6.6.6
            (["198.51.100.1, 10.1.1.1"], "198.51.100.1"),
            (["198.51.100.1", "10.1.1.1, 10.2.2.2"], "198.51.100.1"),
            (["10.1.1.1, 10.2.2.2"], "10.1.1.1"),
            (["garbage, 10.2.2.2"], "10.2.2.2"),
            (["::ffff:198.51.100.9"], "198.51.100.9"),
        ]
        for header, client in cases:
            self.assertEqual(POLICY.client("10.0.0.5", [], header).ip, client, header)

    def test_forwarded_header(self) -> None:
        """RFC 7239 Forwarded wins over X-Forwarded-For, ports and brackets handled."""
        got = POLICY.client(
            "10.0.0.5",
            ['for=198.51.100.1;proto=https, for="[2001:db8:ffff::1]:4711"'],
            ["6.6.6.6"],
        )
        self.assertEqual(got.ip, "198.51.100.1")
        self.assertEqual(POLICY.client("10.0.0.5", ["for=192.0.2.60:8080"], []).ip, "192.0.2.60")
        self.assertEqual(POLICY.client("10.0.0.5", ["proto=https"], []).ip, "10.0.0.5")

    def test_no_headers_from_proxy(self) -> None:
        """A trusted proxy that forwards nothing is itself the client."""
        self.assertEqual(POLICY.client("10.0.0.5", [], []).ip, "10.0.0.5")

    def test_bad_networks(self) -> None:
        """A trusted_proxies entry that is not a network stops the start."""
        self.assertRaises(ConfigError, ProxyPolicy, ["10.0.0.0/33"])
        self.assertRaises(ConfigError, ProxyPolicy, ["proxy.internal"])
        self.assertFalse(ProxyPolicy([]))
