"""The `pgcast` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import psycopg

from bin import logs
from sql import broadcasts, contacts, db, embedded, errors, migrate
from sql.queries import QUERIES

ACCOUNT_DEFAULT = "default"


class UsageError(Exception):
    """Bad command-line input: one line on stderr, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        """Print one line and exit 2."""
        self.exit(2, f"pgcast: error: {message} (see {self.prog} --help)\n")


def _emit(payload: Any) -> None:
    print(json.dumps(payload, default=str, indent=None))


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
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


# -- commands ------------------------------------------------------------------------------


def cmd_db(args: argparse.Namespace) -> int:
    if args.action == "url":
        print(db.database_url())
        return 0
    if os.environ.get("DATABASE_URL"):
        raise UsageError("DATABASE_URL is set: pgcast did not start that server "
                         "and will not stop it")
    stopped = embedded.stop()
    print("stopped" if stopped else "not running")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    with db.connect() as conn:
        applied = migrate.migrate(conn)
    print("applied: " + ", ".join(applied) if applied else "up to date")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from worker import engine
    from worker import main as worker_main

    settings = engine.Settings(
        concurrency=args.concurrency, batch_size=args.batch_size, group_size=args.group_size,
        group_ms=args.group_ms, delay_ms=args.delay_ms, max_retries=args.max_retries,
        max_broadcasts=args.max_broadcasts, once=args.once, lease=args.lease,
        breaker=args.breaker, sweeper=not args.no_sweeper, retry_base=args.retry_base,
        sweep_cron=f"* * * * * */{args.sweep_every}")
    if settings.concurrency < 1 or settings.batch_size < 1:
        raise UsageError("--concurrency and --batch-size must be at least 1")
    if settings.lease < 1:
        raise UsageError("--lease must be at least 1 second")
    try:
        logs.configure(os.environ.get("PGCAST_LOG_LEVEL", "INFO"))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    stats = asyncio.run(worker_main.run(settings, db.database_url(),
                                        metrics_addr=args.metrics_addr))
    print(json.dumps({"sent": stats.sent, "failed": stats.failed, "retried": stats.retried,
                      "groups": stats.groups}), file=sys.stderr)
    return 0


def cmd_contacts(args: argparse.Namespace) -> int:
    if args.action == "import":
        batch = contacts.validate(contacts.read_csv(Path(args.file)))
        with db.connect() as conn:
            written = contacts.upsert(conn, args.account, batch.rows)
        for r in batch.rejected:
            print(f"line {r.where}: {r.email}: {r.reason}", file=sys.stderr)
        _emit({"imported": written, "rejected": len(batch.rejected)})
        return 0
    with db.connect() as conn:
        row = contacts.unsubscribe(conn, args.account, args.email)
    _emit({"success": True, "email": row["email"], "unsubscribed_at": row["unsubscribed_at"]})
    return 0


def _watch(conn: psycopg.Connection[Any], account: str, bid: Any) -> dict[str, Any]:
    from bin import progressbar

    return progressbar.watch(lambda: broadcasts.progress(conn, account, bid))


def cmd_broadcast(args: argparse.Namespace) -> int:
    action = args.action
    with db.connect(autocommit=True) as conn:
        if action == "create":
            if args.text is None and args.html is None:
                raise UsageError("give --text FILE or --html FILE (or both)")
            row = broadcasts.create(conn, args.account, subject=args.subject,
                                    from_address=args.from_address, text=_read_text(args.text),
                                    html=_read_text(args.html), tag=args.tag,
                                    rate_limit=args.rate_limit)
            print(row["id"])
            return 0
        if action == "list":
            for b in broadcasts.list_page(conn, args.account, limit=args.limit):
                print(f"{b['id']}  {b['status']:<9}  {b['sent']:>7}/{b['total']:<7}  "
                      f"{b['created_at']:%Y-%m-%d %H:%M}  {b['subject']}")
            return 0
        bid = broadcasts.parse_id(args.id)
        if action == "status":
            if args.watch:
                final = _watch(conn, args.account, bid)
                _emit(final)
                return 0
            _emit(broadcasts.progress(conn, args.account, bid))
            return 0
        ops: dict[str, Callable[..., dict[str, Any]]] = {
            "send": broadcasts.send, "cancel": broadcasts.cancel,
            "pause": broadcasts.pause, "resume": broadcasts.resume}
        result = ops[action](conn, args.account, bid)
        _emit(result)
        return 0 if result["success"] else 1


def cmd_rate(args: argparse.Namespace) -> int:
    from worker import main as worker_main

    with db.connect(autocommit=True) as conn:
        if args.action == "set":
            burst = args.burst if args.burst is not None else worker_main.default_burst(args.rate)
            if burst < 1:
                raise UsageError("--burst must be at least 1")
            row = conn.execute(QUERIES["rate_set"],
                               {"name": "global", "rate": args.rate, "burst": burst}).fetchone()
        else:
            row = conn.execute(QUERIES["rate_get"], {"name": "global"}).fetchone()
    _emit(row)
    return 0


# -- parser ----------------------------------------------------------------------------------


def build_parser() -> Parser:
    """Every command and flag."""
    p = Parser(prog="pgcast", description="Postgres-native email broadcasts.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    d = sub.add_parser("db", help="the embedded Postgres")
    d.add_argument("action", choices=["url", "stop"])
    d.set_defaults(func=cmd_db)

    sub.add_parser("migrate", help="create or upgrade the schema").set_defaults(func=cmd_migrate)

    w = sub.add_parser("worker", help="run a worker process")
    w.add_argument("--concurrency", type=int, default=4, help="dispatch loops (default 4)")
    w.add_argument("--batch-size", type=int, default=500, help="rows per claim (default 500)")
    w.add_argument("--group-size", type=_group_size, default=None, metavar="N|auto",
                   help="rows per handoff: 'auto' (default) sizes each group to fit --group-ms "
                        "of provider time (1 to --batch-size); N fixes it (the most a crash "
                        "can leave unknown, per loop)")
    # a string default goes through the type check too: a bad PGCAST_GROUP_MS is a usage error
    w.add_argument("--group-ms", type=_group_ms, metavar="MS",
                   default=os.environ.get("PGCAST_GROUP_MS", "250"),
                   help="with --group-size auto: target provider time per group in ms "
                        "(default 250, env PGCAST_GROUP_MS)")
    w.add_argument("--delay-ms", type=_positive(int), default=0, help="pause between batches")
    w.add_argument("--max-retries", type=_positive(int), default=5,
                   help="transient failures per recipient before it fails (default 5)")
    w.add_argument("--max-broadcasts", type=_positive(int), default=0,
                   help="broadcasts worked on at once, oldest first (default 0 = all)")
    w.add_argument("--once", action="store_true", help="drain what is claimable now, then exit")
    w.add_argument("--lease", type=_positive(float),
                   default=float(os.environ.get("PGCAST_LEASE_SECONDS", "30")),
                   help="claim lease in seconds (default 30, env PGCAST_LEASE_SECONDS)")
    w.add_argument("--breaker", type=_positive(int),
                   default=int(os.environ.get("PGCAST_BREAKER", "50")),
                   help="pause a broadcast after N failed handoffs in a row (default 50; 0 = off)")
    w.add_argument("--retry-base", type=_positive(float), default=2.0,
                   help="first transient-retry backoff in seconds (default 2)")
    w.add_argument("--sweep-every", type=int, choices=range(1, 60), metavar="SECONDS",
                   default=int(os.environ.get("PGCAST_SWEEP_SECONDS", "5")),
                   help="sweeper period, 1-59 s (default 5, env PGCAST_SWEEP_SECONDS)")
    w.add_argument("--no-sweeper", action="store_true", help="do not run the sweeper here")
    w.add_argument("--metrics-addr", metavar="HOST:PORT",
                   default=os.environ.get("PGCAST_METRICS_ADDR") or None,
                   help="serve Prometheus metrics there (env PGCAST_METRICS_ADDR; default off)")
    w.set_defaults(func=cmd_worker)

    c = sub.add_parser("contacts", help="import and unsubscribe contacts")
    csub = c.add_subparsers(dest="action", required=True, parser_class=Parser)
    ci = csub.add_parser("import", help="upsert contacts from a CSV (email,name,tags)")
    ci.add_argument("file")
    cu = csub.add_parser("unsubscribe", help="unsubscribe one address")
    cu.add_argument("email")
    for sp in (ci, cu):
        sp.add_argument("--account", default=ACCOUNT_DEFAULT)
    c.set_defaults(func=cmd_contacts)

    b = sub.add_parser("broadcast", help="create, send and control broadcasts")
    bsub = b.add_subparsers(dest="action", required=True, parser_class=Parser)
    bc = bsub.add_parser("create", help="create a draft; prints its id")
    bc.add_argument("--subject", required=True)
    bc.add_argument("--from", dest="from_address", required=True)
    bc.add_argument("--text", metavar="FILE")
    bc.add_argument("--html", metavar="FILE")
    bc.add_argument("--tag", help="send only to contacts with this tag")
    bc.add_argument("--rate-limit", type=_positive(float), help="cap for this broadcast, emails/s")
    bl = bsub.add_parser("list", help="newest first")
    bl.add_argument("--limit", type=int, default=50)
    sps = [bc, bl]
    for name, text in (("send", "snapshot the recipients and start sending"),
                       ("status", "progress (--watch: live bar until done)"),
                       ("cancel", "cancel a draft, sending or paused broadcast"),
                       ("pause", "pause a sending broadcast"),
                       ("resume", "resume a paused broadcast")):
        sp = bsub.add_parser(name, help=text)
        sp.add_argument("id")
        if name == "status":
            sp.add_argument("--watch", action="store_true")
        sps.append(sp)
    for sp in sps:
        sp.add_argument("--account", default=ACCOUNT_DEFAULT)
    b.set_defaults(func=cmd_broadcast)

    r = sub.add_parser("rate", help="the global rate limit")
    rsub = r.add_subparsers(dest="action", required=True, parser_class=Parser)
    rs = rsub.add_parser("set", help="emails per second for all workers (0 = unlimited)")
    rs.add_argument("rate", type=_positive(float))
    rs.add_argument("--burst", type=_positive(float))
    rsub.add_parser("show", help="the current bucket")
    r.set_defaults(func=cmd_rate)

    _add_api_commands(sub)
    return p


def _add_api_commands(sub: Any) -> None:
    try:
        from bin import api_commands
    except ImportError:
        return
    api_commands.register(sub)
    from bin import ops_commands

    ops_commands.register(sub)


def _config_error() -> type[Exception]:
    from worker import errors as worker_errors

    return worker_errors.ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pgcast` console script."""
    args = build_parser().parse_args(argv)
    try:
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
