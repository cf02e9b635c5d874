"""A worker process: the dispatch loops, the control listener, the lease renewer, the sweeper."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import signal

import psycopg
from psycopg_pool import AsyncConnectionPool

from pgcast.mail import errors as mail_errors
from pgcast.mail import unsubscribe
from pgcast.sql import db
from pgcast.sql.queries import QUERIES
from pgcast.worker import (
    control,
    engine,
    errors,
    hooks,
    providers,
    reconcile,
    render,
    retention,
    sweeper,
)

log = logging.getLogger("pgcast.worker")

DEFAULT_SES_RATE = 12.0  # emails/s when SES will not tell us its MaxSendRate
SES_HEADROOM = 0.85  # share of SES's MaxSendRate we use
GC_YOUNG = 10_000  # allocations (net) between collections of the youngest generation


def default_burst(rate: float) -> float:
    """A twentieth of a second's worth of tokens, at least two."""
    # small, so that no second sees much more than the rate; at least two, because a bucket
    # of one loses the refill whenever no taker is waiting at the instant it fills
    # (measured at 12/s: burst 1 achieved -3.1%, burst 2 +0.3%)
    return max(2.0, math.ceil(rate / 20))


def _number(name: str, raw: str) -> float:
    """A finite number from the environment; raises ConfigError."""
    try:
        value = float(raw)
    except ValueError:
        raise errors.ConfigError(f"{name} must be a number, not {raw!r}") from None
    # float() takes "nan" and "inf"; Postgres would store them (NaN >= 0 holds there) and
    # the bucket would then grant everything
    if not math.isfinite(value):
        raise errors.ConfigError(f"{name} must be a finite number, not {raw!r}")
    return value


def configure_rate(url: str, provider: providers.Provider) -> float | None:
    """PGCAST_RATE/PGCAST_BURST (or SES's own limit) as the global bucket's starting value:
    a bucket an operator set (`pgcast rate set`, an UPDATE) keeps its rate, except that SES's
    limit lowers a higher one. The bucket's rate from here on."""
    raw = os.environ.get("PGCAST_RATE")
    burst_raw = os.environ.get("PGCAST_BURST")
    explicit = raw is not None and bool(raw.strip())
    if explicit:
        assert raw is not None
        rate = _number("PGCAST_RATE", raw)
    elif provider.name == "ses":
        known = provider.max_send_rate()
        rate = round(known * SES_HEADROOM, 3) if known else DEFAULT_SES_RATE
    else:
        return None  # leave the bucket as the operator set it
    if rate < 0:
        raise errors.ConfigError("PGCAST_RATE must be >= 0 (0 = unlimited)")
    burst = _number("PGCAST_BURST", burst_raw) if burst_raw else default_burst(rate)
    if burst < 1:
        raise errors.ConfigError("PGCAST_BURST must be >= 1")
    with psycopg.connect(url, autocommit=True, **db.CONNECT_KWARGS) as conn:
        # restarting a worker must not undo the operator's rate (lowered after an SES
        # warning, say): PGCAST_RATE only starts a bucket nobody set; SES's limit is a
        # ceiling, never an order
        row = conn.execute(QUERIES["rate_start"], {"name": "global", "rate": rate,
                                                   "burst": burst, "ceiling": not explicit}
                           ).fetchone()
    assert row is not None
    current, _, applied, operator_at = float(row[0]), row[1], bool(row[2]), row[3]
    if not applied:
        log.info("keeping the global rate %.3g/s an operator set at %s (%s says %.3g/s)",
                 current, operator_at, "PGCAST_RATE" if explicit else "SES", rate)
    return current


def check_unsubscribe_settings(provider: providers.Provider) -> None:
    """SES sends to real inboxes: PGCAST_PUBLIC_URL and PGCAST_UNSUBSCRIBE_SECRET are required."""
    url = os.environ.get("PGCAST_PUBLIC_URL", "").strip()
    secret = os.environ.get("PGCAST_UNSUBSCRIBE_SECRET", "").strip()
    if provider.name == "ses" and not (url and secret):
        raise errors.ConfigError(
            "the ses provider needs PGCAST_PUBLIC_URL (where `pgcast api` is reachable) and "
            "PGCAST_UNSUBSCRIBE_SECRET (at least 32 bytes) for one-click unsubscribe links")
    try:
        unsubscribe.public_url(url)
        if secret:
            unsubscribe.parse_secrets(secret)
    except mail_errors.InvalidValue as exc:
        raise errors.ConfigError(str(exc)) from None


async def _renew(eng: engine.Engine) -> None:
    """Extend the lease on everything this worker holds, every third of a lease."""
    while not eng.stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(eng.stopping.wait(), timeout=eng.settings.lease / 3)
        if eng.stopping.is_set():
            return
        if not eng.tokens_in_hand:
            continue
        try:
            async with eng.pool.connection() as conn:
                held = list(eng.tokens_in_hand.items())
                await conn.execute(QUERIES["renew"], {"tokens": [t for t, _ in held],
                                                      "ids": [b for _, b in held],
                                                      "lease": eng.settings.lease})
        except psycopg.OperationalError as exc:
            log.warning("lease renewal failed (%s); will retry", exc)


async def _run_sweeper(url: str, settings: engine.Settings, stopping: asyncio.Event,
                       listen: bool, retention_days: float | None) -> None:
    """procrastinate's worker for the sweeper task (and retention's, on a loop of its own),
    restarted after a database outage; `listen`: `url` is a session of our own (else
    procrastinate polls for its jobs)."""
    delay = 1.0
    while not stopping.is_set():
        try:
            app = sweeper.make_app(url, settings.sweep_cron, retention_days)
            async with app.open_async():
                loops = [app.run_worker_async(queues=[sweeper.QUEUE], install_signal_handlers=False,
                                              delete_jobs="successful", name="pgcast-sweeper",
                                              listen_notify=listen,
                                              fetch_job_polling_interval=settings.poll * 5)]
                if retention_days is not None:
                    loops.append(app.run_worker_async(
                        queues=[retention.QUEUE], install_signal_handlers=False,
                        delete_jobs="successful", name="pgcast-retention",
                        listen_notify=listen, fetch_job_polling_interval=settings.poll * 5))
                await asyncio.gather(*loops)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - an outage must not end the sweeper for good
            log.warning("sweeper stopped (%s); restarting in %.0fs", exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), timeout=delay)
        delay = min(30.0, delay * 2)


async def run(settings: engine.Settings, url: str,
              metrics_addr: str | None = None, webhooks: bool = True) -> engine.Stats:
    """Run one worker process until SIGTERM/SIGINT (or drained, with --once); with
    `metrics_addr`, serve Prometheus metrics there; `webhooks`: deliver webhooks too."""
    # a bad PGCAST_WEBHOOKS_* stops the start, not a delivery
    hook_settings = hooks.Settings.from_env() if webhooks and not settings.once else None
    provider: providers.Provider = providers.from_env(settings.max_in_flight)
    check_unsubscribe_settings(provider)
    make_engine = engine.Engine
    if metrics_addr:
        from pgcast.sql import metrics as sql_metrics
        from pgcast.worker import metrics

        sql_metrics.serve(metrics_addr, url)
        provider, make_engine = metrics.MeteredProvider(provider), metrics.MeteredEngine
    retention_days = retention.days_from_env()
    reconcile.after_from_env()  # a bad PGCAST_RECONCILE_AFTER stops the start, not a sweep
    configure_rate(url, provider)
    if settings.once:
        sweeper.sweep_once(url)
    # LISTEN needs a session of its own, which a transaction pooler does not give
    direct = db.listen_url(url)
    if direct is None:
        log.info("DATABASE_URL goes through a pooler and PGCAST_LISTEN_URL is unset: "
                 "polling every %.1fs instead of LISTEN", settings.poll)
    # each loop's claim, handoff and tokens, the records of its groups in flight, the renewer
    pool = AsyncConnectionPool(url, min_size=1, max_size=2 * settings.concurrency + 4,
                               kwargs={"autocommit": True, **db.CONNECT_KWARGS}, open=False,
                               # no check per getconn: it was a round trip before every
                               # statement (a fifth of a worker's CPU at 200/s against SES);
                               # a connection a restart killed fails its statement with
                               # OperationalError, which every caller rides out, and the pool
                               # drops it when it comes back broken
                               reconnect_timeout=3600)
    await pool.open(wait=True, timeout=30)
    # the render processes start before the first handoff: a row handed off waits for no
    # process to start (its call must begin within --group-ms)
    await render.pool().start()
    eng = make_engine(settings, provider, pool)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # finish the group in hand, release the rest of the batch, exit 0
        loop.add_signal_handler(sig, eng.stopping.set)
    side = [asyncio.create_task(_renew(eng), name="renew")]
    if direct is not None:
        side.append(asyncio.create_task(control.listen(direct, eng.state, eng.stopping),
                                        name="listen"))
    if settings.sweeper and not settings.once:
        side.append(asyncio.create_task(
            _run_sweeper(direct or url, settings, eng.stopping, direct is not None,
                         retention_days),
            name="sweeper"))
    if hook_settings is not None:  # its own connections and slots, apart from the mail's
        side.append(asyncio.create_task(
            hooks.Deliverer(url, hook_settings, eng.stopping, eng.name).run(), name="webhooks"))
    log.info("worker %s started (provider %s, %d dispatch loops, at most %d calls in flight)",
             eng.name, provider.name, settings.concurrency, settings.max_in_flight)
    # what start-up built (modules, boto3's service model) lives as long as the process: out
    # of the collector's sight, a full collection no longer walks it (tens of milliseconds
    # with boto3 loaded, every thread held meanwhile: calls the pacer spaced would bunch)
    gc.freeze()
    # a group's messages (about six containers per recipient: the message, its fields, its
    # headers, its outcome...) live until the group is recorded; at Python's default 700 the
    # collector ran about seven times per group of 500 and walked each message on its way to
    # the oldest generation: measured with gc.callbacks, 0.15 s per 100,000 recipients of a
    # null-provider drain (1.5 µs each, issue 32). A group's containers die by refcount when
    # it is recorded, so at 10,000 the young generation is seldom collected (once per
    # 100,000 recipients, ~1 ms); cyclic garbage waits a little longer
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
    try:
        stats = await eng.run()
    finally:
        eng.stopping.set()
        for task in side:
            task.cancel()
        for task in side:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await pool.close()
    if settings.once:
        sweeper.sweep_once(url)
    return stats
