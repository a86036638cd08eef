"""Settings: options over TOML over defaults, every bad value named in one line."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from securepub.core.apikeys import load_api_keys
from securepub.core.errors import ConfigError
from securepub.core.history import HistoryPolicy
from securepub.core.limits import Limits
from securepub.server.settings import load_settings

KEY = "k" * 32


class SettingsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.dir)
        for name in ("server.pem", "server.key"):
            self.write(name, "placeholder")
        self.write("keys", f"# backends\n{KEY}\n\n")

    def write(self, name: str, text: str) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write(text)
        return path

    def options(self, **extra: object) -> dict[str, object]:
        base: dict[str, object] = {
            "cert": "server.pem",
            "key": "server.key",
            "api-key-file": "keys",
        }
        base.update(extra)
        return base

    def error(self, options: dict[str, object]) -> str:
        e = self.assertRaises(ConfigError, load_settings, options, self.dir)
        message = str(e)
        self.assertNotIn("\n", message)
        return message

    def test_defaults(self) -> None:
        """Without a config file the SPEC's defaults apply."""
        s = load_settings(self.options(), self.dir)
        self.assertEqual((s.port, s.interface, s.origin_policy), (8443, "127.0.0.1", "enforce"))
        self.assertEqual(s.limits, Limits())
        self.assertEqual(s.allowed_origins, ())
        self.assertEqual(s.cert, os.path.join(self.dir, "server.pem"))
        self.assertEqual(len(s.api_keys), 1)

    def test_toml_and_relative_paths(self) -> None:
        """TOML values apply, paths are relative to the file's own folder."""
        os.mkdir(os.path.join(self.dir, "conf"))
        self.write("conf/keys", KEY + "\n")
        self.write("conf/chat.json", '{"type": "object"}')
        config = self.write(
            "conf/securepub.toml",
            'port = 9443\ninterface = "0.0.0.0"\ncert = "../server.pem"\n'
            'key = "/abs/server.key"\napi_key_file = "keys"\n'
            'allowed_origins = ["https://app.example.com"]\norigin_policy = "log"\n'
            "[limits]\nmax_message_bytes = 1000\nmax_publish_rate = 2.5\n"
            '[[topics]]\npattern = "chat.*"\nschema = "chat.json"\nclient_publish = true\n'
            '[[topics]]\npattern = "news.>"\n',
        )
        s = load_settings({"config": config}, self.dir)
        self.assertEqual((s.port, s.interface, s.origin_policy), (9443, "0.0.0.0", "log"))
        self.assertEqual(s.cert, os.path.join(self.dir, "server.pem"))
        self.assertEqual(s.key, "/abs/server.key")
        self.assertEqual(s.limits.max_message_bytes, 1000)
        self.assertEqual(s.limits.max_publish_rate, 2.5)
        self.assertEqual([r.pattern.text for r in s.topics], ["chat.*", "news.>"])
        self.assertEqual(s.topics[0].schema, {"type": "object"})
        self.assertTrue(s.topics[0].client_publish)
        self.assertFalse(s.topics[1].client_publish)
        self.assertEqual(s.allowed_origins, ("https://app.example.com",))

    def test_command_line_wins(self) -> None:
        """A command-line option overrides the same key in the TOML file."""
        config = self.write("c.toml", "port = 9443\n")
        s = load_settings(self.options(config="c.toml", port="10443"), self.dir)
        self.assertEqual(s.port, 10443)
        self.assertTrue(config)

    def test_dev_adds_local_origins(self) -> None:
        """--dev allows https://localhost:PORT and https://127.0.0.1:PORT."""
        s = load_settings(self.options(dev=True, port="9000"), self.dir)
        self.assertEqual(s.allowed_origins, ("https://localhost:9000", "https://127.0.0.1:9000"))

    def test_bad_values_name_the_key(self) -> None:
        """Each bad value stops the start with one line naming the key."""
        cases = {
            "port": self.options(port="http"),
            "interface": self.options(interface="example.com"),
        }
        for key, options in cases.items():
            self.assertIn(key, self.error(options))
        self.assertIn("port", self.error(self.options(port="70000")))

    def test_bad_toml_values(self) -> None:
        """Unknown keys, wrong types and out-of-range limits are refused."""
        cases = {
            "bogus = 1\n": "bogus",
            'origin_policy = "maybe"\n': "origin_policy",
            'allowed_origins = "https://a"\n': "allowed_origins",
            "[limits]\nmax_json_depth = 0\n": "limits.max_json_depth",
            "[limits]\nmax_errors = true\n": "limits.max_errors",
            "[limits]\nmax_connections = 5\n": "max_connections",
            '[[topics]]\nschema = "x.json"\n': "pattern",
            '[[topics]]\npattern = "a..b"\n': "topics[0].pattern",
            '[[topics]]\npattern = "a"\nclient_publish = "yes"\n': "client_publish",
            '[[topics]]\npattern = "a"\nextra = 1\n': "extra",
            '[[topics]]\npattern = "a"\nschema = "missing.json"\n': "topics[0].schema",
            "port = [\n": "not valid TOML",
            '[[topics]]\npattern = "a"\nhistory_size = 10001\n': "topics[0].history_size",
            '[[topics]]\npattern = "a"\nhistory_size = -1\n': "topics[0].history_size",
            '[[topics]]\npattern = "a"\nhistory_size = 5\nhistory_ttl = 0\n': "history_ttl",
            '[[topics]]\npattern = "a"\nhistory_size = 5\nhistory_ttl = 86401\n': "history_ttl",
            '[[topics]]\npattern = "a"\nhistory_ttl = 60\n': "only used together",
            "[limits]\nmax_history_bytes = 5\n": "limits.max_history_bytes",
        }
        for text, expected in cases.items():
            self.write("c.toml", text)
            self.assertIn(expected, self.error(self.options(config="c.toml")), text)

    def test_history_rules(self) -> None:
        """history_size and history_ttl make a rule's policy; none by default."""
        self.write(
            "c.toml",
            '[[topics]]\npattern = "news.>"\nhistory_size = 100\n\n'
            '[[topics]]\npattern = "feed.*"\nhistory_size = 7\nhistory_ttl = 30\n\n'
            '[[topics]]\npattern = "plain"\n',
        )
        rules = load_settings(self.options(config="c.toml"), self.dir).topics
        self.assertEqual(
            [r.history for r in rules],
            [HistoryPolicy(100, 300), HistoryPolicy(7, 30), None],
        )

    def test_history_that_could_outgrow_the_memory_bound_is_refused(self) -> None:
        """One topic's fullest history must fit limits.max_history_bytes (embedded engine)."""
        self.write(
            "c.toml",
            "[limits]\nmax_message_bytes = 65536\nmax_history_bytes = 104857600\n\n"
            '[[topics]]\npattern = "news.>"\nhistory_size = 10000\n',
        )
        message = self.error(self.options(config="c.toml"))
        self.assertIn("topics[0].history_size", message)
        self.assertIn("limits.max_history_bytes", message)
        with_redis = self.options(config="c.toml", redis="redis://127.0.0.1:6379")
        self.assertEqual(load_settings(with_redis, self.dir).topics[0].history.size, 10000)

    def test_bad_schema_file(self) -> None:
        """A schema that is not strict JSON is refused naming the rule."""
        self.write("s.json", '{"type": "object", "type": "array"}')
        self.write("c.toml", '[[topics]]\npattern = "a"\nschema = "s.json"\n')
        self.assertIn("topics[0].schema", self.error(self.options(config="c.toml")))

    def test_required_files(self) -> None:
        """cert, key and api_key_file are required unless --dev."""
        for key in ("cert", "key", "api-key-file"):
            options = self.options()
            del options[key]
            self.assertIn(key.replace("-", "_"), self.error(options))

    def test_client_ca_path(self) -> None:
        """--client-ca is a path, relative to the working directory."""
        s = load_settings(self.options(**{"client-ca": "ca.pem"}), self.dir)
        self.assertEqual(s.client_ca, os.path.join(self.dir, "ca.pem"))

    def test_redis_url(self) -> None:
        """redis:// and rediss:// URLs with credentials and a database are parsed."""
        s = load_settings(self.options(redis="redis://app:s%40cret@10.1.2.3:6380/2"), self.dir)
        [redis] = s.redis
        self.assertEqual(
            (redis.host, redis.port, redis.db, redis.username, redis.password),
            ("10.1.2.3", 6380, 2, "app", "s@cret"),
        )
        self.assertFalse(redis.tls)
        self.assertNotIn("cret", repr(s) + redis.display())
        ca = self.write("redis-ca.pem", "x")
        s = load_settings(
            self.options(redis="rediss://cache.internal", **{"redis-ca": ca}), self.dir
        )
        [redis] = s.redis
        self.assertEqual((redis.tls, redis.port, redis.db, redis.ca), (True, 6379, None, ca))

    def test_several_redis_servers(self) -> None:
        """redis may list several servers: a TOML list, or the option given more than once."""
        self.write("c.toml", 'redis = ["redis://a:6379", "rediss://b:6390/1"]\n')
        s = load_settings(self.options(config="c.toml"), self.dir)
        self.assertEqual([r.display() for r in s.redis], ["redis://a:6379", "rediss://b:6390/1"])
        s = load_settings(self.options(redis=["redis://x", "redis://y"]), self.dir)
        self.assertEqual([r.host for r in s.redis], ["x", "y"])
        for bad in ([], ["redis://x", "redis://x"], [5]):
            self.assertIn("redis", self.error(self.options(redis=bad)))

    def test_cluster_secret(self) -> None:
        """A cluster secret file is read with Redis, refused without it or when short."""
        self.write("secret", "s" * 40 + "\n")
        s = load_settings(
            self.options(redis="redis://h", **{"cluster-secret-file": "secret"}), self.dir
        )
        assert s.cluster_signer is not None
        self.assertNotIn("s" * 40, repr(s))
        self.assertIn(
            "cluster_secret_file", self.error(self.options(**{"cluster-secret-file": "secret"}))
        )
        self.write("short", "abc")
        self.assertIn(
            "cluster_secret_file",
            self.error(self.options(redis="redis://h", **{"cluster-secret-file": "short"})),
        )

    def test_reuse_port_needs_redis(self) -> None:
        """--reuse-port without Redis stops the start: processes could not share messages."""
        self.assertIn("reuse_port", self.error(self.options(**{"reuse-port": True})))
        s = load_settings(self.options(redis="redis://h", **{"reuse-port": True}), self.dir)
        self.assertTrue(s.reuse_port)

    def test_bad_redis_values(self) -> None:
        """Bad Redis URLs, and a Redis CA without rediss://, name the key."""
        for url in ("http://x", "redis://", "redis://h/db", "redis://h:99999", "redis://h/0?x=1"):
            self.assertIn("redis", self.error(self.options(redis=url)))
        self.assertIn("redis_ca", self.error(self.options(**{"redis-ca": "ca.pem"})))
        self.assertIn(
            "redis_ca", self.error(self.options(redis="redis://h", **{"redis-ca": "ca.pem"}))
        )

    def test_missing_config_file(self) -> None:
        """A config path that cannot be read is named."""
        self.assertIn("nope.toml", self.error(self.options(config="nope.toml")))


class ApiKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp()
        self.addCleanup(_rmtree, self.dir)

    def keys_file(self, text: str) -> str:
        path = os.path.join(self.dir, "keys")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_check(self) -> None:
        """Only listed keys pass; comments and blank lines are not keys."""
        keys = load_api_keys(self.keys_file(f"# comment\n\n{KEY}\n{'b' * 20}\n"))
        self.assertEqual(len(keys), 2)
        self.assertTrue(keys.check(KEY.encode()))
        self.assertTrue(keys.check(b"b" * 20))
        self.assertFalse(keys.check(b"# comment"))
        self.assertFalse(keys.check(b""))
        self.assertFalse(keys.check(KEY.encode()[:-1]))

    def test_repr_hides_keys(self) -> None:
        """Neither repr nor the settings' repr shows a key."""
        keys = load_api_keys(self.keys_file(KEY + "\n"))
        self.assertNotIn(KEY, repr(keys))

    def test_empty_or_weak_files_refused(self) -> None:
        """An empty file, a short key or a key with spaces stops the start."""
        for text in ("", "# only a comment\n", "short\n", "a key with spaces in it\n"):
            e = self.assertRaises(ConfigError, load_api_keys, self.keys_file(text))
            self.assertIn("api_key_file", str(e))
            self.assertNotIn("short", str(e).split(":", 1)[0])

    def test_unreadable(self) -> None:
        """A missing key file is named."""
        e = self.assertRaises(ConfigError, load_api_keys, os.path.join(self.dir, "none"))
        self.assertIn("none", str(e))

    def test_scopes_parsed(self) -> None:
        """A key may be followed by publish=PATTERNS; keys without one are unlimited."""
        keys = load_api_keys(self.keys_file(f"{KEY} publish=orders.>,news.*\n{'b' * 20}\n"))
        found, scopes = keys.lookup(KEY.encode())
        assert scopes is not None
        self.assertTrue(found)
        self.assertEqual([p.text for p in scopes], ["orders.>", "news.*"])
        self.assertEqual(keys.lookup(b"b" * 20), (True, None))
        self.assertEqual(keys.lookup(b"nope-nope-nope-nope"), (False, None))

    def test_bad_scopes(self) -> None:
        """Unknown options or bad patterns stop the start, naming the line, not the key."""
        for text in (
            f"{KEY} admin=yes\n",
            f"{KEY} publish=a..b\n",
            f"{KEY} publish=\n",
            f"{KEY} publish=a publish=b\n",
        ):
            e = self.assertRaises(ConfigError, load_api_keys, self.keys_file(text))
            self.assertIn("line 1", str(e))
            self.assertNotIn(KEY, str(e))


def _rmtree(path: str) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
