"""The `pgcast` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import psycopg

from pgcast.bin import (
    broadcast_commands,
    contacts_commands,
    logs,
    output,
    reconcile_commands,
    schedule_commands,
    segment_commands,
)
from pgcast.mail import errors as mail_errors
from pgcast.mail import template, validate
from pgcast.sql import broadcasts, contacts, db, embedded, errors, migrate, subscribers
from pgcast.sql.queries import QUERIES

ACCOUNT_DEFAULT = output.ACCOUNT_DEFAULT
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
MAX_IN_FLIGHT = "128"  # --max-in-flight's default: worker.engine.MAX_IN_FLIGHT (a test checks)


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit 2."""
        self.exit(2, f"pgcast: error: {message} (see {self.prog} --help)\n")


def _emit(payload: Any) -> None:
    output.emit(payload)


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pgcast")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def log_level() -> str:
    """PGCAST_LOG_LEVEL, checked: a bad value is one line naming the variable."""
    raw = os.environ.get("PGCAST_LOG_LEVEL", "INFO")
    if raw.strip().lower() not in LOG_LEVELS:
        raise UsageError(f"PGCAST_LOG_LEVEL: {raw!r} is not a log level; use one of "
                         f"{', '.join(LOG_LEVELS)} (default info)")
    return raw.strip().upper()


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high]."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return value

    return parse


_priority = _bounded_int(1, 10)
_weight = _bounded_int(1, 1000)


def _env_number(var: str, kind: type, default: str) -> Callable[[str], Any]:
    """A type for a flag whose default comes from `var`: errors name both."""
    check = _positive(kind)

    def parse(raw: str) -> Any:
        try:
            return check(raw)
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (flag or {var})") from None
    return parse


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be a finite number >= 0: {raw!r}")
        return value
    return parse


def _group_ms(raw: str) -> float:
    """A finite number of milliseconds > 0 (from --group-ms or PGCAST_GROUP_MS)."""
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number > 0 (flag or PGCAST_GROUP_MS): {raw!r}")
    return value


def _sweep_seconds(raw: str) -> int:
    """The sweeper's period: a whole number of seconds, 1-59 (--sweep-every or env)."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 59:
        raise argparse.ArgumentTypeError(
            f"must be a whole number of seconds from 1 to 59 (flag or PGCAST_SWEEP_SECONDS): "
            f"{raw!r}")
    return value


def _at_least_one(raw: str) -> int:
    """A whole number >= 1 (from a flag or its environment variable)."""
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1: {raw!r}")
    return value


def _group_size(raw: str) -> int | None:
    """`auto` (None: sized to the provider's measured speed) or a whole number >= 1."""
    if raw.strip().lower() == "auto":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto' or a whole number >= 1: {raw!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 'auto' or a whole number >= 1: {raw!r}")
    return value


def _read_text(path: str | None) -> str | None:
    return None if path is None else output.read_file(path)


# -- commands ------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "url":
        url = db.database_url()
        if not os.environ.get("DATABASE_URL"):
            # stdout is the URL alone (scripts capture it); where the data lives goes to stderr
            print(f"pgcast: data in {embedded.pgdata()}", file=sys.stderr)
        print(url)
        return 0
    if os.environ.get("DATABASE_URL"):
        raise UsageError("DATABASE_URL is set: pgcast did not start that server "
                         "and will not stop it")
    print(f"pgcast: data in {embedded.pgdata()}", file=sys.stderr)
    stopped = embedded.stop()
    print("stopped" if stopped else "not running")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    with db.connect() as conn:
        applied = migrate.migrate(conn)
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from pgcast.worker import engine
    from pgcast.worker import main as worker_main

    settings = engine.Settings(
        concurrency=args.concurrency, batch_size=args.batch_size, group_size=args.group_size,
        group_ms=args.group_ms, max_in_flight=args.max_in_flight,
        delay_ms=args.delay_ms, max_retries=args.max_retries,
        max_broadcasts=args.max_broadcasts, once=args.once, lease=args.lease,
        breaker=args.breaker, sweeper=not args.no_sweeper, retry_base=args.retry_base,
        sweep_cron=f"* * * * * */{args.sweep_every}")
    if settings.concurrency < 1 or settings.batch_size < 1 or settings.max_in_flight < 1:
        raise UsageError("--concurrency, --batch-size and --max-in-flight must be at least 1")
    if settings.lease < 1:
        raise UsageError("--lease must be at least 1 second")
    level = log_level()
    try:
        logs.configure(level)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if level != "DEBUG":
        # procrastinate logs each periodic sweep job at INFO: DEBUG material for an operator
        logging.getLogger("procrastinate").setLevel(logging.WARNING)
    # on uvloop, as the API (a dependency; the asyncio loop when it is not installed)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        stats = runner.run(worker_main.run(settings, db.database_url(),
                                           metrics_addr=args.metrics_addr,
                                           webhooks=not args.no_webhooks))
    print(json.dumps({"sent": stats.sent, "failed": stats.failed, "retried": stats.retried,
                      "groups": stats.groups, "connections": stats.connections,
                      "wire": stats.wire}),
          file=sys.stderr)
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed, else None (asyncio's own)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def cmd_contacts(args: argparse.Namespace) -> int:
    if args.action == "import":
        return contacts_commands.cmd_import(args)
    with db.connect() as conn:
        row = contacts.unsubscribe(conn, args.account, args.email, source="cli",
                                   actor=output.actor(args.actor))
    _emit({"success": True, "email": row["email"], "unsubscribed_at": row["unsubscribed_at"]})
    return 0


def _watch(conn: psycopg.Connection[Any], account: str, bid: Any) -> dict[str, Any]:
    from pgcast.bin import progressbar

    return progressbar.watch(lambda: broadcast_commands.progress(conn, account, bid))


def cmd_broadcast(args: argparse.Namespace) -> int:
    action = args.action
    with db.connect(autocommit=True) as conn:
        if action == "create":
            if args.text is None and args.html is None:
                raise UsageError("give --text FILE or --html FILE (or both)")
            row = broadcasts.create(conn, args.account, subject=args.subject,
                                    from_address=args.from_address, text=_read_text(args.text),
                                    html=_read_text(args.html), tag=args.tag,
                                    segment=args.segment,
                                    filter_value=segment_commands.filter_arg(args.filter),
                                    rate_limit=args.rate_limit, priority=args.priority,
                                    details=output.actor(args.actor), track=args.track)
            if args.archive:
                subscribers.set_archive(conn, args.account, row["id"], True)
            for warning in template.warnings(row["text_body"], row["html_body"]):
                print(f"pgcast: warning: {warning}", file=sys.stderr)
            print(row["id"])
            return 0
        if action == "list":
            broadcast_commands.print_list(conn, args)
            return 0
        bid = broadcast_commands.resolve_id(conn, args.account, args.id)
        if action == "status":
            if args.watch:
                final = _watch(conn, args.account, bid)
                _emit(final)
                return 0
            _emit(broadcast_commands.progress(conn, args.account, bid))
            return 0
        if action == "send":
            result = broadcasts.send(conn, args.account, bid, allow_empty=args.allow_empty,
                                     details=output.actor(args.actor))
        else:
            ops: dict[str, Callable[..., dict[str, Any]]] = {
                "cancel": broadcasts.cancel, "pause": broadcasts.pause,
                "resume": broadcasts.resume}
            result = ops[action](conn, args.account, bid, details=output.actor(args.actor))
        _emit(result)
        return 0 if result["success"] else 1


def cmd_rate(args: argparse.Namespace) -> int:
    from pgcast.worker import main as worker_main

    with db.connect(autocommit=True) as conn:
        if args.action == "set":
            burst = args.burst if args.burst is not None else worker_main.default_burst(args.rate)
            if burst < 1:
                raise UsageError("--burst must be at least 1")
            row = conn.execute(QUERIES["rate_set"],
                               {"name": "global", "rate": args.rate, "burst": burst}).fetchone()
        elif args.action == "weight":
            row = conn.execute(QUERIES["rate_weight_set"],
                               {"account": args.weight_account, "weight": args.weight}).fetchone()
        else:
            row = conn.execute(QUERIES["rate_get"], {"name": "global"}).fetchone()
            if row is not None:
                # who shares it now, and the weights the operator set
                row = {**row,
                       "weights": conn.execute(QUERIES["rate_weights"]).fetchall(),
                       "shares": conn.execute(QUERIES["rate_shares"],
                                              {"name": "global"}).fetchall()}
    _emit(row)
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> Parser:
    """Every command and flag."""
    p = Parser(prog="pgcast", description="Postgres-native email broadcasts.")
    p.add_argument("--version", action="version", version=f"pgcast {_version()}",
                   help="print pgcast's version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    d = sub.add_parser("db", help="the embedded Postgres")
    d.add_argument("action", choices=["url", "stop"],
                   help="url: print the database URL (starting the embedded server); "
                        "stop: stop the embedded server")
    d.set_defaults(func=cmd_db)

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)

    w = sub.add_parser("worker", help="run a worker process")
    w.add_argument("--concurrency", type=int, default=4,
                   help="dispatch loops: claims worked on at once (default 4); provider calls "
                        "in flight are --max-in-flight's")
    w.add_argument("--batch-size", type=int, default=500,
                   help="the most rows one claim takes (default 500); claims are sized to "
                        "about a second of this process's sending")
    w.add_argument("--max-in-flight", metavar="N",
                   # a string default goes through the type check too, like --group-ms
                   type=_at_least_one, default=os.environ.get("PGCAST_MAX_IN_FLIGHT",
                                                              MAX_IN_FLIGHT),
                   help="the most provider calls in flight at once in this process (default "
                        f"{MAX_IN_FLIGHT}, env PGCAST_MAX_IN_FLIGHT)")
    w.add_argument("--group-size", type=_group_size, default=None, metavar="N|auto",
                   help="rows per handoff: 'auto' (default) sizes each group to fit --group-ms "
                        "of provider time (1 to --batch-size); N fixes it (the most a crash "
                        "can leave unknown, per loop)")
    # a string default goes through the type check too: a bad PGCAST_GROUP_MS is a usage error
    w.add_argument("--group-ms", type=_group_ms, metavar="MS",
                   default=os.environ.get("PGCAST_GROUP_MS", "250"),
                   help="with --group-size auto: target provider time per group in ms "
                        "(default 250, env PGCAST_GROUP_MS)")
    w.add_argument("--delay-ms", type=_positive(int), default=0,
                   help="pause between batches in ms (default 0)")
    w.add_argument("--max-retries", type=_positive(int), default=5,
                   help="transient failures per recipient before it fails (default 5)")
    w.add_argument("--max-broadcasts", type=_positive(int), default=0,
                   help="broadcasts worked on at once, those furthest below their fair share "
                        "first (default 0 = all)")
    w.add_argument("--once", action="store_true", help="drain what is claimable now, then exit")
    # string defaults go through the type too: a bad variable is a one-line usage error
    w.add_argument("--lease", type=_env_number("PGCAST_LEASE_SECONDS", float, "30"),
                   default=os.environ.get("PGCAST_LEASE_SECONDS", "30"),
                   help="claim lease in seconds (default 30, env PGCAST_LEASE_SECONDS)")
    w.add_argument("--breaker", type=_env_number("PGCAST_BREAKER", int, "50"),
                   default=os.environ.get("PGCAST_BREAKER", "50"),
                   help="pause a broadcast after N failed handoffs in a row (default 50; 0 = off)")
    w.add_argument("--retry-base", type=_positive(float), default=2.0,
                   help="first transient-retry backoff in seconds (default 2)")
    w.add_argument("--sweep-every", type=_sweep_seconds, metavar="SECONDS",
                   default=os.environ.get("PGCAST_SWEEP_SECONDS", "5"),
                   help="sweeper period, 1-59 s (default 5, env PGCAST_SWEEP_SECONDS)")
    w.add_argument("--no-sweeper", action="store_true", help="do not run the sweeper here")
    w.add_argument("--no-webhooks", action="store_true",
                   help="do not deliver webhooks here (docs/webhooks.md)")
    w.add_argument("--metrics-addr", metavar="HOST:PORT",
                   default=os.environ.get("PGCAST_METRICS_ADDR") or None,
                   help="serve Prometheus metrics there (env PGCAST_METRICS_ADDR; default off)")
    w.set_defaults(func=cmd_worker)

    c = sub.add_parser("contacts", help="import, list, export, unsubscribe and erase contacts")
    csub = c.add_subparsers(dest="action", required=True, parser_class=Parser)
    ci = csub.add_parser("import", help="upsert contacts from a CSV (email,name,tags, other "
                                        "columns become attributes)")
    ci.add_argument("file", help="the CSV file; its header names the columns")
    ci.add_argument("--encoding", default="utf-8",
                    help="the file's text encoding (default utf-8), e.g. latin-1, cp1252")
    ci.add_argument("--replace", action="store_true",
                    help="replace name, tags and attributes as a whole (default: an empty "
                         "cell keeps what is stored, attributes merge)")
    cu = csub.add_parser("unsubscribe", help="unsubscribe one address")
    cu.add_argument("email", help="the contact's address")
    cu.add_argument("--actor", metavar="NAME",
                    help="who is doing this, for contact_events (default: the OS user)")
    for sp in (ci, cu, *contacts_commands.register(csub, ACCOUNT_DEFAULT)):
        sp.add_argument("--account", default=ACCOUNT_DEFAULT,
                        help=f"the account (tenant) to act on (default {ACCOUNT_DEFAULT})")
    c.set_defaults(func=cmd_contacts)
    from pgcast.bin import suppression_commands  # suppressed, unsuppress (SES feedback)

    suppression_commands.register(csub, ACCOUNT_DEFAULT)

    b = sub.add_parser("broadcast", help="create, send and control broadcasts")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=Parser)
    bc = bsub.add_parser("create", help="create a draft; prints its id")
    bc.add_argument("--subject", required=True, help="the subject line")
    bc.add_argument("--from", dest="from_address", required=True, metavar="ADDR",
                    help="the From: address, as a@example.com or 'Name <a@example.com>'")
    bc.add_argument("--text", metavar="FILE", help="the plain-text body (--text, --html or both)")
    bc.add_argument("--html", metavar="FILE", help="the HTML body (--text, --html or both)")
    bc.add_argument("--tag", help="send only to contacts with this tag")
    bc.add_argument("--segment", metavar="NAME", help="send to a saved segment (its definition "
                                                      "at send); one of --tag/--segment/--filter")
    bc.add_argument("--filter", metavar="JSON", help="send to the contacts a filter selects at "
                                                     "send (JSON or @FILE; docs/segments.md)")
    bc.add_argument("--rate-limit", type=_positive(float), help="cap for this broadcast, emails/s")
    bc.add_argument("--priority", type=_priority, default=1, metavar="N",
                    help="1-10 (default 1): its weight among its account's sending broadcasts "
                         "when the rate limit is the constraint")
    bc.add_argument("--archive", action="store_true",
                    help="list it, once sent, on the account's public archive page")
    bc.add_argument("--actor", metavar="NAME",
                    help="who is doing this, for the audit log (default: the OS user)")
    from pgcast.bin import tracking_commands  # --track, `broadcast stats`, `tracking default`

    tracking_commands.add_track_flag(bc)
    bl = bsub.add_parser("list", help="newest first: a table on a terminal, else JSON")
    bl.add_argument("--limit", type=int, default=50, help="at most N broadcasts (default 50)")
    bl.add_argument("--json", action="store_true", help="JSON even on a terminal")
    from pgcast.bin import draft_commands  # show, edit, delete: their own func

    sps = [bc, bl, *broadcast_commands.register(bsub), *draft_commands.register(bsub),
           *tracking_commands.register_broadcast(bsub)]
    for name, text in (("send", "snapshot the recipients and start sending"),
                       ("status", "progress (--watch: live bar until done)"),
                       ("cancel", "cancel a draft, scheduled, sending or paused broadcast"),
                       ("pause", "pause a sending broadcast"),
                       ("resume", "resume a paused broadcast")):
        sp = bsub.add_parser(name, help=text)
        sp.add_argument("id", help="the broadcast id, or a unique prefix of 8+ characters")
        if name == "status":
            sp.add_argument("--watch", action="store_true",
                            help="draw a live bar until the broadcast is terminal or paused")
        if name == "send":
            sp.add_argument("--allow-empty", action="store_true",
                            help="send even when no contact matches (default: refused, exit 1)")
        if name in ("send", "cancel", "pause", "resume"):
            sp.add_argument("--actor", metavar="NAME",
                            help="who is doing this, for the audit log (default: the OS user)")
        sps.append(sp)
    for sp in sps:
        sp.add_argument("--account", default=ACCOUNT_DEFAULT,
                        help=f"the account (tenant) to act on (default {ACCOUNT_DEFAULT})")
    b.set_defaults(func=cmd_broadcast)
    from pgcast.bin import content_commands  # preview and test: their own func

    content_commands.register(bsub, ACCOUNT_DEFAULT)
    schedule_commands.register(bsub, ACCOUNT_DEFAULT)

    r = sub.add_parser("rate", help="the global rate limit")
    rsub = r.add_subparsers(dest="action", required=True, parser_class=Parser)
    rs = rsub.add_parser("set", help="emails per second for all workers (0 = unlimited)")
    rs.add_argument("rate", type=_positive(float), help="emails per second (0 = unlimited)")
    rs.add_argument("--burst", type=_positive(float),
                    help="bucket size: emails that may go at once (default: about 1 s of rate)")
    rsub.add_parser("show", help="the current bucket, the account weights and the active "
                                 "shares (who takes tokens now, and each one's emails/s)")
    rw = rsub.add_parser("weight", help="an account's weight in the global rate's fair share "
                                        "(operator only; default 1)")
    rw.add_argument("weight_account", metavar="ACCOUNT", help="the account")
    rw.add_argument("weight", type=_weight, metavar="N",
                    help="an integer 1-1000: the account gets N times the share of a weight-1 "
                         "account while both are limited by the rate")
    r.set_defaults(func=cmd_rate)
    reconcile_commands.register(sub, ACCOUNT_DEFAULT)
    segment_commands.register(sub, ACCOUNT_DEFAULT)

    from pgcast.bin import message_commands  # transactional messages (issue 26)

    message_commands.register(sub, rsub, Parser)

    from pgcast.bin import senders_commands  # operator only: the senders an account may use

    senders_commands.register(sub, Parser)
    from pgcast.bin import hooks_commands  # outgoing webhooks

    hooks_commands.register(sub, Parser, ACCOUNT_DEFAULT)
    from pgcast.bin import subscribers_commands  # forms, topics, archive (issue 28)

    subscribers_commands.register(sub, Parser, ACCOUNT_DEFAULT)
    tracking_commands.register(sub, Parser)
    _add_api_commands(sub)
    return p


def _add_api_commands(sub: Any) -> None:
    try:
        from pgcast.bin import api_commands
    except ImportError:
        return
    api_commands.register(sub)
    from pgcast.bin import ops_commands

    ops_commands.register(sub)


def _config_error() -> type[Exception]:
    from pgcast.worker import errors as worker_errors

    return worker_errors.ConfigError


# every ACCOUNT a command takes
ACCOUNT_ARGS = ("account", "weight_account", "sender_account", "archive_account",
                "tracking_account")


def check_accounts(args: argparse.Namespace) -> None:
    """One limit on account names, the API's and the database's; raises UsageError."""
    for name in ACCOUNT_ARGS:
        value = getattr(args, name, None)
        if value is None:
            continue
        try:
            validate.account(value)
        except mail_errors.InvalidValue as exc:
            raise UsageError(f"the account name {exc.reason}") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pgcast` console script."""
    args = build_parser().parse_args(argv)
    try:
        check_accounts(args)
        if args.command in ("worker", "api"):
            log_level()  # a bad PGCAST_LOG_LEVEL: one line naming it, not a traceback
        return int(args.func(args))
    except (UsageError, errors.InvalidInput) as exc:
        print(f"pgcast: error: {exc}", file=sys.stderr)
        return 2
    except errors.NotFound as exc:
        print(f"pgcast: error: {exc}", file=sys.stderr)
        return 2
    except (errors.EmbeddedServerError, _config_error()) as exc:
        print(f"pgcast: error: {exc}", file=sys.stderr)
        return 2
    except psycopg.errors.UndefinedTable:
        print("pgcast: error: the database has no pgcast schema: run `pgcast migrate`",
              file=sys.stderr)
        return 2
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"pgcast: error: cannot reach Postgres: {first}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
