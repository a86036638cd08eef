"""The ``securepub`` command line: certificates, tickets, publishing, subscribing, history,
presence."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, Any, NoReturn

from securepub.clients.blocking import DEFAULT_URL, ClientError, Publisher
from securepub.core.errors import ConfigError, RequestError

ENVIRONMENT = """\
environment:
  SECUREPUB_URL      the server, https://HOST:PORT (default https://localhost:8443)
  SECUREPUB_API_KEY  a backend API key (securepub --dev writes one to certs/api-key)
  SECUREPUB_CA       PEM file of the CA that signed the server's certificate
                     (default: the system's trust store); the certificate is
                     always verified
"""

#: Exit statuses: 1 for any failure, 2 for a command line that does not parse.
EXIT_FAILURE = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line that cannot be run; the message is one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (argparse prints the usage too)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _err(message: str) -> None:
    sys.stderr.write(f"securepub: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _one_line(text: str) -> str:
    """One line of printable text: whitespace runs collapsed, control characters escaped."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _status(args: argparse.Namespace, text: str) -> None:
    """A status line on stderr, unless --quiet."""
    if not args.quiet:
        sys.stderr.write(f"securepub: {_one_line(text)}\n")
        sys.stderr.flush()


def _server(args: argparse.Namespace) -> tuple[str, str, str | None]:
    """The URL, API key and CA file: the options first, then the environment."""
    url = args.url or os.environ.get("SECUREPUB_URL") or DEFAULT_URL
    ca = args.ca or os.environ.get("SECUREPUB_CA") or None
    api_key = os.environ.get("SECUREPUB_API_KEY", "").strip()
    if not api_key:
        raise UsageError(
            "SECUREPUB_API_KEY is not set; export it first, for example "
            "export SECUREPUB_API_KEY=$(cat certs/api-key)"
        )
    return url, api_key, ca


def _publisher(args: argparse.Namespace) -> Publisher:
    url, api_key, ca = _server(args)
    return Publisher(url, api_key, ca)


def _print_json(value: Any, out: IO[str] | None = None) -> None:
    """One JSON line; every non-ASCII character escaped, so no byte can steer a terminal."""
    stream = out or sys.stdout
    stream.write(json.dumps(value, separators=(",", ":"), ensure_ascii=True) + "\n")
    stream.flush()


def _parse_json(text: str, where: str) -> Any:
    from securepub.core import jsonstrict

    try:
        return jsonstrict.loads(text.encode("utf-8", "surrogateescape"))
    except RequestError as e:
        raise UsageError(f"{where}: {e.message}") from None


# -- commands -------------------------------------------------------------------


def _certs(args: argparse.Namespace) -> int:
    from securepub.dev.certs import describe, ensure_dev_certs

    certs = ensure_dev_certs(os.path.abspath(args.certs_dir))
    print(describe(certs))
    return 0


def _ticket(args: argparse.Namespace) -> int:
    with _publisher(args) as publisher:
        ticket = publisher.issue_ticket(
            args.user,
            client_ip=args.client_ip,
            subscribe=args.subscribe or (),
            publish=args.publish or (),
            ttl=args.ttl,
            session_ttl=args.session_ttl,
        )
    _print_json(ticket.as_json())
    return 0


def _stdin_messages() -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(sys.stdin, start=1):
        if line.strip():
            yield number, _parse_json(line, f"line {number} of stdin")


def _publish(args: argparse.Namespace) -> int:
    if args.json == "-":
        messages: Iterator[tuple[int | None, Any]] = _stdin_messages()
    else:
        messages = iter([(None, _parse_json(args.json, "the JSON argument"))])
    with _publisher(args) as publisher:
        for number, data in messages:
            try:
                message_id = publisher.publish(args.topic, data)
            except ClientError as e:
                if number is not None:
                    raise ClientError(f"line {number} of stdin: {e}") from None
                raise
            sys.stdout.write(message_id + "\n")
            sys.stdout.flush()
    return 0


def _history(args: argparse.Namespace) -> int:
    with _publisher(args) as publisher:
        page = publisher.history(args.topic, since=args.since, limit=args.limit)
    for message in page.messages:
        _print_json(message)
    count = len(page.messages)
    text = (
        f"{args.topic}: {count} message{'s' if count != 1 else ''} after offset {args.since}; "
        f"the topic is at offset {page.offset}, epoch {page.epoch}"
    )
    if page.next_since is not None:
        text += f"; more with --since {page.next_since}"
    _status(args, text)
    return 0


def _presence(args: argparse.Namespace) -> int:
    with _publisher(args) as publisher:
        users = publisher.presence(args.topic)
    _print_json(users)
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    url, api_key, ca = _server(args)
    from twisted.internet import reactor

    from securepub.clients.twisted_client import Subscriber, TwistedPublisher

    publisher = TwistedPublisher(reactor, url, api_key, ca)
    patterns: list[str] = args.patterns
    received = 0

    def get_ticket() -> Any:
        # Only what is still subscribed: the server may have ended some subscriptions.
        # The same ticket request opens a session and refreshes it (SPEC section 9).
        d = publisher.issue_ticket(
            args.user, subscribe=subscriber.patterns, ttl=30, session_ttl=args.session_ttl
        )
        return d.addCallback(lambda issued: issued.ticket)

    def status(text: str) -> None:
        _status(args, text)

    def on_message(frame: dict[str, Any]) -> None:
        nonlocal received
        try:
            _print_json(frame)
        except BrokenPipeError:
            _silence_stdout()
            subscriber.stop()
            return
        received += 1
        if args.count is not None and received >= args.count:
            subscriber.stop()

    def on_event(frame: dict[str, Any]) -> None:
        # join and leave (SPEC section 10): printed like messages, not counted by --count.
        try:
            _print_json(frame)
        except BrokenPipeError:
            _silence_stdout()
            subscriber.stop()

    subscriber = Subscriber(
        reactor,
        url,
        patterns,
        get_ticket,
        on_message,
        ca=ca,
        on_status=status,
        on_event=on_event,
    )
    return _run_reactor(reactor, subscriber.run, publisher.close)


def _run_reactor(reactor: Any, run: Callable[[], Any], cleanup: Callable[[], Any]) -> int:
    """Run ``run()``'s Deferred to its end; a `ClientError` becomes one line on stderr."""
    from twisted.internet.defer import maybeDeferred
    from twisted.python.failure import Failure

    outcome: list[Failure | None] = []

    def finished(result: Any) -> Any:
        outcome.append(result if isinstance(result, Failure) else None)
        d = maybeDeferred(cleanup)
        d.addBoth(lambda _: reactor.stop())
        return None

    def start() -> None:
        maybeDeferred(run).addBoth(finished)

    reactor.callWhenRunning(start)
    reactor.run()
    if not outcome or outcome[0] is None:
        return 0  # stopped by --count, or by a signal (Ctrl-C)
    failure = outcome[0]
    if failure.check(ClientError):
        _err(str(failure.value))
    else:
        _err(f"unexpected {type(failure.value).__name__}: {failure.getErrorMessage()}")
    return EXIT_FAILURE


# -- the parser -------------------------------------------------------------------


def _int_in(low: int, high: int | None, what: str) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (no upper bound if None)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:20]!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"{what} is {bounds}")
        return value

    return parse


_ttl = _int_in(1, 300, "the TTL in seconds")
_count = _int_in(1, None, "the count")
_offset = _int_in(0, 2**53 - 1, "the offset")
_limit = _int_in(1, 1000, "the limit")
_session_ttl = _int_in(1, 86400, "the session TTL in seconds")

SESSION_TTL_HELP = (
    "how long a session lasts before it must be refreshed, in seconds (the server allows "
    "[limits] min_session_seconds to max_session_seconds, by default 60 to 3600; default: "
    "the maximum)"
)


def _server_options() -> _Parser:
    common = _Parser(add_help=False)
    group = common.add_argument_group("server")
    group.add_argument(
        "--url",
        metavar="URL",
        help="the server, https://HOST:PORT (default: $SECUREPUB_URL, else " + DEFAULT_URL + ")",
    )
    group.add_argument(
        "--ca",
        metavar="PEM",
        help="CA file to verify the server's certificate with (default: $SECUREPUB_CA, else "
        "the system's trust store)",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="securepub",
        description="Tools for the securepub publish/subscribe server.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )
    server = _server_options()

    certs = commands.add_parser(
        "certs",
        help="generate (once) a development CA, a localhost certificate and an API key",
        description="Generate, once, a development CA, a localhost certificate signed by "
        "it and a random API key. Existing files are never overwritten.",
    )
    certs.add_argument(
        "--certs-dir",
        default="certs",
        metavar="DIR",
        help="where to write them (default: ./certs)",
    )
    certs.set_defaults(run=_certs)

    ticket = commands.add_parser(
        "ticket",
        parents=[server],
        help="issue a WebSocket ticket and print it as JSON",
        description="Issue a single-use WebSocket ticket (POST /v1/tickets) and print the "
        'server\'s answer, {"ticket": ..., "expires_at": ...}, as one JSON line.',
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ticket.add_argument("--user", required=True, help="the user the ticket is for")
    ticket.add_argument(
        "--client-ip", metavar="IP", help="only a connection from this address may redeem it"
    )
    ticket.add_argument(
        "--subscribe",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="topic patterns it may subscribe to",
    )
    ticket.add_argument(
        "--publish",
        nargs="+",
        action="extend",
        metavar="PATTERN",
        help="topic patterns it may publish to (where a [[topics]] rule allows browsers to)",
    )
    ticket.add_argument(
        "--ttl", type=_ttl, metavar="SECONDS", help="validity, 1 to 300 seconds (default 30)"
    )
    ticket.add_argument(
        "--session-ttl", type=_session_ttl, metavar="SECONDS", help=SESSION_TTL_HELP
    )
    ticket.set_defaults(run=_ticket)

    publish = commands.add_parser(
        "publish",
        parents=[server],
        help="publish a JSON message to a topic",
        description="Publish to TOPIC and print the message id. JSON is the message's data; "
        "with -, every non-empty line of standard input is one message, all sent over one "
        "connection, and each id is printed as its message is published.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    publish.add_argument("topic", metavar="TOPIC", help="for example demo.hello")
    publish.add_argument(
        "json", metavar="JSON", help="the data, any JSON value, or - to read lines from stdin"
    )
    publish.set_defaults(run=_publish)

    subscribe = commands.add_parser(
        "subscribe",
        parents=[server],
        help="print the messages published to topics",
        description="Subscribe to each PATTERN and print every message as one JSON line "
        '({"op":"message","topic":...,"id":...,"ts":...,"data":...}; on a topic with history '
        'also "offset" and "epoch"). A lost connection is retried with backoff, each time '
        "with a fresh ticket, and the patterns are subscribed again; an exact topic with "
        "history resumes after the last message printed, so the messages missed meanwhile "
        "are printed first, in order. When the server's history no longer reaches back, a "
        "status line says 'TOPIC: not recovered (...): refetch' and the missed messages are "
        "lost. The session is refreshed in-band before it expires (a status line says "
        "'session refreshed until HH:MM:SS'). On a topic whose rule has join_leave = true, "
        'the server\'s {"op":"join",...} and {"op":"leave",...} frames are printed as JSON '
        "lines too. Runs until interrupted, or until --count messages arrived.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subscribe.add_argument(
        "patterns", nargs="+", metavar="PATTERN", help="topics or patterns (news.*, demo.>)"
    )
    subscribe.add_argument(
        "--user", default="securepub-cli", help="the user its tickets name (default: %(default)s)"
    )
    subscribe.add_argument(
        "--count",
        type=_count,
        metavar="N",
        help="exit after N messages (join and leave frames do not count; default: never)",
    )
    subscribe.add_argument(
        "--session-ttl", type=_session_ttl, metavar="SECONDS", help=SESSION_TTL_HELP
    )
    subscribe.add_argument(
        "--quiet", action="store_true", help="no status lines on stderr, only errors"
    )
    subscribe.set_defaults(run=_subscribe)

    history = commands.add_parser(
        "history",
        parents=[server],
        help="print the messages a topic's history holds",
        description="Print the messages of TOPIC's history after offset --since "
        "(GET /v1/history), oldest first, each as one JSON line exactly as subscribe prints "
        "it. Then a status line on stderr gives the count and the topic's position, e.g. "
        "'securepub: news.a: 2 messages after offset 0; the topic is at offset 2, epoch E', "
        "ending with '; more with --since N' when --limit cut the page short. The topic must "
        "be an exact topic a [[topics]] rule keeps history for (--dev: demo.>).",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    history.add_argument("topic", metavar="TOPIC", help="for example demo.hello")
    history.add_argument(
        "--since",
        type=_offset,
        default=0,
        metavar="N",
        help="print the messages after offset N (default: 0, all the history holds)",
    )
    history.add_argument(
        "--limit",
        type=_limit,
        default=100,
        metavar="N",
        help="at most N messages, 1 to 1000 (default: %(default)s)",
    )
    history.add_argument(
        "--quiet", action="store_true", help="no status line on stderr, only errors"
    )
    history.set_defaults(run=_history)

    presence = commands.add_parser(
        "presence",
        parents=[server],
        help="print who is subscribed to a topic",
        description="Print who is subscribed to TOPIC on every node (GET /v1/presence), as "
        'one JSON line mapping each user to its open sessions on the topic: {"alice":2}. '
        "The topic must be an exact topic whose [[topics]] rule has presence = true.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    presence.add_argument("topic", metavar="TOPIC", help="for example chat.room1")
    presence.set_defaults(run=_presence)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; errors are one line on stderr and a non-zero exit, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.run(args)
        sys.stdout.flush()
        return result
    except UsageError as e:
        _err(str(e))
        return EXIT_USAGE
    except (ClientError, ConfigError) as e:
        _err(str(e))
        return EXIT_FAILURE
    except BrokenPipeError:
        # `securepub publish ... - | head -1`: the reader left, which is not an error.
        _silence_stdout()
        return 0
    except OSError as e:
        _err(e.strerror or str(e))
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a bug still gets one line, not a traceback
        _err(f"internal error ({type(e).__name__}); please report it")
        return EXIT_FAILURE


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    raise SystemExit(main())
