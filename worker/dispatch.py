"""Dispatching to the provider: render and send each message on its own, classify outcomes.

Every recipient gets an outcome, whatever raises: a message that cannot be built fails
with the reason; a provider error is classified (worker.errors); any other exception from
the provider is `unknown` when the request may have left (a network provider), `failed`
otherwise. Nothing here raises, so a group handed off is always recorded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import operator
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

from pgcast.worker import errors, providers, ratelimit, render

log = logging.getLogger("pgcast.worker")

ERROR_CHARS = 500  # characters of an error kept in last_error
THROTTLE_CAP = 30.0  # seconds: the longest backoff after provider throttles in a row


@dataclass(slots=True)
class Outcome:
    """What happened to one recipient of a group."""

    contact_id: int
    outcome: str  # sent | failed | unknown | retry | throttled | release
    message_id: str | None = None
    error: str | None = None
    retry_in: float = 0.0
    pause_reason: str | None = None  # account-level trouble: pause the broadcast
    seconds: float | None = None  # the provider call's duration; None: never called


Each = Callable[[asyncio.Future[Outcome]], None]  # a done-callback per row's call

# the stop list of the group whose call runs on this thread (set by Sender.send_one around the
# provider's send): a provider that paces at the wire reads it after the pacer's wait
_calling = threading.local()


def at_the_wire(pace: Callable[[], object]) -> Callable[[], None]:
    """What a provider that paces at the wire (ses) calls right before each request leaves:
    the pacer's wait, then the group's stop check. A throttle or an account-level refusal
    that came back while the call waited stops it here (errors.Stopped, nothing written), as
    the check before the pacer would have: the group's later calls are not sent to be refused
    one by one."""

    def gate() -> None:
        pace()  # a SendBulkEmail call books its entries' time (ratelimit.carrying)
        stop: list[Outcome] | None = getattr(_calling, "stop", None)
        if stop:
            raise errors.Stopped(f"not called: its group was stopped ({stop[0].outcome})")

    return gate


@dataclass
class Retries:
    """How transient failures and throttles are retried."""

    max_retries: int = 5  # transient failures tolerated per recipient before `failed`
    retry_base: float = 2.0  # seconds: first transient backoff
    retry_cap: float = 300.0  # seconds: longest transient backoff
    throttle_backoff: float = 1.0  # seconds: first throttle backoff


def backoff(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff with full jitter in [d/2, d] for the given attempt (1-based)."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay / 2 + random.random() * delay / 2


def describe(exc: BaseException) -> str:
    """An unexpected exception as one bounded line for last_error (its type says most)."""
    return f"{type(exc).__name__}: {exc}"[:ERROR_CHARS]


def reason(exc: errors.ProviderError) -> str:
    """A classified provider error for last_error: its own words."""
    return str(exc)[:ERROR_CHARS]


class Recipient(NamedTuple):
    """A row handed off: whom to send to. A tuple: one is built per recipient, and a frozen
    dataclass cost several times as much to build (issue 32)."""

    contact_id: int
    email: str
    name: str | None
    attributes: dict[str, Any] | None = None  # the contact's attributes, when the query has them
    tags: list[str] | None = None  # the contact's tags, for {{ contact.tags }}


def recipient(row: dict[str, Any]) -> Recipient:
    """From a `handoff` or `claim_handoff` row."""
    return Recipient(row["contact_id"], row["email"], row["name"], row.get("attributes"),
                     row.get("tags"))


RENDER_STREAK = 3  # render budget failures in a row that pause a broadcast (render_budget)
SKELETONS = 256  # contents whose skeleton (or its absence) a Builder keeps


def cannot_build(cid: int, why: str, pause_reason: str | None = None) -> Outcome:
    """The `failed` outcome of a message that cannot be built."""
    return Outcome(cid, "failed", error=f"cannot build the message: {why}"[:ERROR_CHARS],
                   pause_reason=pause_reason)


class Builder:
    """Builds a group's messages in the render pool and counts budget failures in a row, per
    broadcast content: past RENDER_STREAK the broadcast is paused (render_budget) and the
    rest of the group is put back unrendered: one bad template is not rendered a million
    times."""

    def __init__(self, pool: render.Pool | None = None) -> None:
        self.pool = pool  # None: the process's render pool
        # (broadcast id, content key) -> budget failures in a row; none: no failure in a row
        self.streaks: dict[tuple[str, str], int] = {}
        # content key -> its skeleton (None: rendered per message), being made or made
        self.skeletons: dict[str, tuple[str, asyncio.Future[render.Skeleton | None]]] = {}

    def forget(self, broadcast_id: uuid.UUID | str) -> None:
        """The broadcast is no longer worked on: its streaks go."""
        gone = str(broadcast_id)
        self.streaks = {k: v for k, v in self.streaks.items() if k[0] != gone}
        self.skeletons = {k: v for k, v in self.skeletons.items() if v[0] != gone}

    async def skeleton(self, content: render.Content) -> render.Skeleton | None:
        """The content's skeleton, made once per content (groups of it share the first
        render's task); None: its messages are rendered one by one in the pool."""
        if content.links_printed() is None:
            return None
        known = self.skeletons.get(content.key)
        if known is None or known[1].get_loop() is not asyncio.get_running_loop():
            if len(self.skeletons) >= SKELETONS:  # the oldest goes (made again if needed)
                del self.skeletons[next(iter(self.skeletons))]
            known = (content.broadcast_id,
                     asyncio.ensure_future(render.skeleton(content, self.pool)))
            self.skeletons[content.key] = known
        try:
            return await asyncio.shield(known[1])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - not made this time: asked again next group
            log.warning("broadcast %s: no skeleton this time (%s): rendered one by one",
                        content.broadcast_id, describe(exc))
            if self.skeletons.get(content.key) is known:
                del self.skeletons[content.key]
            return None

    async def build(self, content: render.Content | str,
                    handed: list[Recipient]) -> list[render.Message | Outcome]:
        """A message or a `failed`/`release` outcome per recipient, in order."""
        if isinstance(content, str):  # the broadcast's own content cannot be built
            return [cannot_build(r.contact_id, content) for r in handed]
        key = (content.broadcast_id, content.key)
        streak = self.streaks.get(key, 0)
        if streak >= RENDER_STREAK:  # paused by now, or about to be: nothing more is rendered
            return [Outcome(r.contact_id, "release", pause_reason="render_budget",
                            error="not rendered: the render budget was exceeded "
                                  f"{streak} times in a row") for r in handed]
        made = await self.skeleton(content)
        if made is not None:  # nothing per recipient but the links: filled here, no template
            # a Recipient starts (contact id, address, name), what a fill reads
            results = await render.fill_many(content, made, handed)
        else:
            results = await render.render_many(content, [
                (r.contact_id, r.email, r.name, r.attributes, r.tags, None) for r in handed],
                RENDER_STREAK - streak, self.pool)
        if not any(isinstance(result, render.Failure) for result in results):
            # every message built: no failure in a row left (what the loop below gives)
            self.streaks.pop(key, None)
            return cast("list[render.Message | Outcome]", results)
        # read again after the await: groups of the same broadcast render side by side, and
        # each adds its failures in a row to what the others left (no update lost)
        streak = self.streaks.get(key, 0)
        built: list[render.Message | Outcome] = []
        for r, result in zip(handed, results, strict=True):
            if not isinstance(result, render.Failure):
                streak = 0
                built.append(result)
            elif result.skipped:  # never rendered: back to pending, no attempt counted
                built.append(Outcome(r.contact_id, "release", error=result.reason,
                                     pause_reason=result.budget))
            else:
                streak = streak + 1 if result.budget else 0
                built.append(cannot_build(r.contact_id, result.reason, "render_budget"
                                          if streak >= RENDER_STREAK else None))
        if streak:
            self.streaks[key] = streak
        else:  # kept small: only contents failing right now
            self.streaks.pop(key, None)
        return built


class Sender:
    """Sends groups of messages: side by side on an executor for a blocking provider, in
    order on the event loop for one that is not.

    On the executor each call first meets the deadline: a row whose call has not started
    within `deadline` seconds of its handoff and its render (a starved thread pool) is not
    called at all but put back (`release`: pending again, no attempt counted). Then the pacer,
    the rate limit's last word (here, or inside the provider right before its request leaves:
    ses, through at_the_wire), which holds a call about burst / rate at most. The group's
    stop list is checked after the pacer's wait (a throttle or an account-level refusal that
    came back meanwhile stops the call: put back like the calls stopped before it). So what
    a crash can leave `unknown` is the calls in flight and the rows handed off in the last
    `deadline` seconds plus their render time (bounded by the render budget).

    A provider with send_many (ses: SendBulkEmail) gets a group's messages in chunks, one
    executor call per chunk, each meeting the deadline and its first message's slot for all
    its messages; every row keeps its own outcome and its own future (`each`).
    """

    def __init__(self, provider: providers.Provider, retries: Retries,
                 executor: concurrent.futures.Executor | None,
                 pacer: ratelimit.Pacer | None = None, deadline: float = math.inf) -> None:
        self.provider = provider
        self.retries = retries
        self.executor = executor
        self.pacer = pacer
        self.deadline = deadline
        # an exception the provider did not classify may come after the request left
        self.may_have_sent = bool(getattr(provider, "may_have_sent_on_error", True))
        self._throttles = 0  # provider throttles in a row: the next one backs off longer
        self.too_late = 0  # calls not made: too late for their wire slots (put back)
        # a provider that does not block and takes many messages a call (null): a group's
        # messages in one call on the event loop
        self.in_one_call = not provider.blocking and hasattr(provider, "send_many")
        self._lock = threading.Lock()
        self.builder = Builder()

    async def send_group(self, content: render.Content | str,
                         handed: list[Recipient], attempts: dict[int, int],
                         handed_at: float | None = None,
                         each: Each | None = None,
                         slots: ratelimit.Slots | None = None) -> list[Outcome]:
        """One outcome per handed-off row, in order; never raises (but CancelledError).
        `handed_at`: the handoff's time (time.monotonic), for the deadline; `each`: called
        with each row's future as soon as it is done (on the executor path), so that an
        answer need not wait for the group's slowest call; `slots`: the group's wire slots
        (the i-th row's call waits for the i-th)."""
        rendering = time.monotonic()
        built = await self.builder.build(content, handed)
        rendered = time.monotonic() - rendering
        stop: list[Outcome] = []  # a throttle or account trouble: the rest are not called
        if self.executor is None or not self.provider.blocking:
            return self.send_in_order(built, attempts, stop)
        # the render's time does not count against the deadline: a group whose render took
        # longer than --group-ms (a big template, a busy render pool) was released whole,
        # claimed again and released again, for ever
        due = (handed_at if handed_at is not None else rendering) + rendered + self.deadline
        most = self._chunk_max(slots)
        if most > 1:
            return await self._send_chunks(built, attempts, stop, due, most, each, slots)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = []
        for i, b in enumerate(built):
            if isinstance(b, Outcome):
                done: asyncio.Future[Outcome] = loop.create_future()
                done.set_result(b)
                futures.append(done)
            else:
                futures.append(loop.run_in_executor(self.executor, self.paced, b, attempts,
                                                    stop, due,
                                                    slots.at(i) if slots else None))
        if each is not None:
            for future in futures:
                future.add_done_callback(each)
        return list(await asyncio.gather(*futures))

    def paced(self, message: render.Message, attempts: dict[int, int], stop: list[Outcome],
              due: float, slot: ratelimit.Slot | None = None) -> Outcome:
        """On a provider thread: the deadline, the pacer (until `slot`, when the call has
        one), then the call (a call past its deadline books no pacer time: nobody would use
        it). A call too late for its slot is put back, not made (`release`)."""
        with ratelimit.on_this_thread(slot):  # where the call leaves (ses) or here
            held = self._hold([message.contact_id], stop, due, slot)
            return held[0] if held else self.send_one(message, attempts, stop)

    def _hold(self, cids: list[int], stop: list[Outcome], due: float,
              slot: ratelimit.Slot | None) -> list[Outcome] | None:
        """Before one call carrying the messages of `cids` (inside on_this_thread(slot)): the
        deadline, its slot, then the pacer's wait for all of them. None: the call goes now;
        else each message's outcome, the call not made."""
        if time.monotonic() > due:
            return [Outcome(cid, "release",
                            error="not called: its call would have started too late after "
                                  "its handoff (see --group-ms)") for cid in cids]
        if slot is not None and slot.too_late(time.monotonic()):
            return [self._not_called(cid, ratelimit.TOO_LATE) for cid in cids]
        if self.pacer is not None and not stop:
            try:
                self.pacer.wait(len(cids))
            except errors.NotCalled as exc:
                return [self._not_called(cid, str(exc)) for cid in cids]
        return None

    def _not_called(self, cid: int, why: str) -> Outcome:
        """A call too late for its wire slot: put back, not made."""
        with self._lock:
            self.too_late += 1
        return Outcome(cid, "release", error=why)

    def send_one(self, message: render.Message, attempts: dict[int, int],
                 stop: list[Outcome]) -> Outcome:
        """Send one message (any thread); whatever happens becomes its outcome."""
        started = time.perf_counter()
        _calling.stop = stop  # read at the wire, after the pacer (at_the_wire)
        try:
            outcome, called = self._call(message, attempts, stop)
        finally:
            _calling.stop = None
        if called:
            outcome.seconds = time.perf_counter() - started
        return outcome

    def send_in_order(self, built: list[render.Message | Outcome], attempts: dict[int, int],
                      stop: list[Outcome]) -> list[Outcome]:
        """send_one for each message of a group, one after another on this thread (a provider
        that does not block): each message's outcome as send_one gives it, with the clock
        read once per call rather than twice and the stop list set once per group (issue
        32: the null provider's CPU per recipient). A provider with send_many gets the
        group's messages in one call (send_many), each keeping its own outcome."""
        if self.in_one_call:
            messages = [b for b in built if not isinstance(b, Outcome)]
            if len(messages) == len(built):
                return self.send_many(messages, attempts, stop)
            answered = iter(self.send_many(messages, attempts, stop) if messages else ())
            return [b if isinstance(b, Outcome) else next(answered) for b in built]
        out: list[Outcome] = []
        _calling.stop = stop  # read at the wire, after the pacer (at_the_wire)
        try:
            started = time.perf_counter()
            for b in built:
                if isinstance(b, Outcome):
                    out.append(b)
                    continue
                outcome, called = self._call(b, attempts, stop)
                ended = time.perf_counter()
                if called:
                    outcome.seconds = ended - started
                started = ended
                out.append(outcome)
        finally:
            _calling.stop = None
        return out

    def _call(self, message: render.Message, attempts: dict[int, int],
              stop: list[Outcome]) -> tuple[Outcome, bool]:
        """One message's provider call and its outcome, and whether a call was made (its
        time counts): none after a stop, nor when the call raised Stopped."""
        cid = message.contact_id
        if stop:
            return Outcome(cid, stop[0].outcome, retry_in=stop[0].retry_in), False
        try:
            outcome = Outcome(cid, "sent", message_id=str(self.provider.send(message)))
            self._throttles = 0
            return outcome, True
        except Exception as exc:  # noqa: BLE001 - one recipient's outcome, never the process's
            return self._failed(cid, exc, attempts, stop), not isinstance(exc, errors.Stopped)

    def _failed(self, cid: int, exc: Exception, attempts: dict[int, int],
                stop: list[Outcome], throttle: Outcome | None = None) -> Outcome:
        """The outcome of a provider call's error for one recipient (appended to `stop` when
        it stops the group). `throttle`: the throttle outcome this call already gave another
        of its messages (one SendBulkEmail call is one throttle, not one per entry)."""
        if isinstance(exc, errors.Stopped):
            # stopped after the pacer's wait: put back as the check before it does, never called
            first = stop[0] if stop else Outcome(cid, "release")
            return Outcome(cid, first.outcome, retry_in=first.retry_in)
        if isinstance(exc, errors.Throttled):
            if throttle is not None:
                return Outcome(cid, "throttled", error=reason(exc), retry_in=throttle.retry_in)
            with self._lock:
                self._throttles += 1
                n = self._throttles
            outcome = Outcome(cid, "throttled", error=reason(exc), retry_in=backoff(
                n, self.retries.throttle_backoff, THROTTLE_CAP))
            stop.append(outcome)
            return outcome
        if isinstance(exc, errors.NotCalled):  # too late for its wire slot (at the wire)
            return self._not_called(cid, reason(exc))
        if isinstance(exc, errors.Unsupported):  # never sent: again, one message per call
            return Outcome(cid, "release", error=reason(exc))
        if isinstance(exc, errors.AccountBlocked):
            if not any(o.outcome == "release" for o in stop):
                stop.append(Outcome(cid, "release"))
            return Outcome(cid, "release", error=reason(exc), pause_reason=exc.reason)
        if isinstance(exc, errors.RecipientRejected):
            return Outcome(cid, "failed", error=reason(exc))
        if isinstance(exc, errors.OutcomeUnknown):
            return Outcome(cid, "unknown", error=reason(exc))
        if isinstance(exc, errors.Transient):
            attempt = attempts.get(cid, 0) + 1
            if attempt > self.retries.max_retries:
                return Outcome(cid, "failed",
                               error=f"gave up after {attempt} attempts: {exc}"[:ERROR_CHARS])
            return Outcome(cid, "retry", error=reason(exc), retry_in=backoff(
                attempt, self.retries.retry_base, self.retries.retry_cap))
        log.error("provider %s raised an unclassified error for contact %s",
                  self.provider.name, cid, exc_info=exc)
        kind = "unknown" if self.may_have_sent else "failed"
        return Outcome(cid, kind, error=f"unexpected provider error: {describe(exc)}"
                       [:ERROR_CHARS])

    # -- many messages per call (a provider with send_many: ses's SendBulkEmail) ----------

    def _chunk_max(self, slots: ratelimit.Slots | None) -> int:
        """The most messages one call may carry for this group (1: one per call): the
        provider's own limit, and under a global rate the bucket's burst (a call spends its
        messages' tokens at once)."""
        bulk_max = getattr(self.provider, "bulk_max", None)
        if bulk_max is None or not hasattr(self.provider, "send_many"):
            return 1
        most = int(bulk_max())
        if slots is not None and math.isfinite(slots.burst):
            most = min(most, max(1, int(slots.burst)))
        return most

    async def _send_chunks(self, built: list[render.Message | Outcome],
                           attempts: dict[int, int], stop: list[Outcome], due: float,
                           most: int, each: Each | None,
                           slots: ratelimit.Slots | None) -> list[Outcome]:
        """send_group's executor path for a provider that carries many messages per call:
        the built messages in chunks of at most `most` messages and CHUNK_BYTES, one
        executor call per chunk (one alone goes by send, as it always did); every row still
        has its own future, so `each` is called for each row."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Outcome]] = [loop.create_future() for _ in built]
        for i, b in enumerate(built):
            if isinstance(b, Outcome):
                futures[i].set_result(b)
        calls: list[asyncio.Future[Any]] = []
        for chunk in chunks([i for i, b in enumerate(built) if not isinstance(b, Outcome)],
                            [b for b in built if not isinstance(b, Outcome)], most):
            slot = slots.at(chunk[0]) if slots else None  # its first message's wire slot
            messages = [b for b in (built[i] for i in chunk) if not isinstance(b, Outcome)]
            if len(messages) == 1:
                call: asyncio.Future[Any] = loop.run_in_executor(
                    self.executor, self.paced, messages[0], attempts, stop, due, slot)
            else:
                call = loop.run_in_executor(self.executor, self.paced_many, messages,
                                            attempts, stop, due, slot)
            call.add_done_callback(_spread(chunk, futures))
            calls.append(call)
        if each is not None:
            for future in futures:
                future.add_done_callback(each)
        try:
            return list(await asyncio.gather(*futures))
        except asyncio.CancelledError:
            for call in calls:  # a call not started yet is never made, as one per message
                call.cancel()
            raise

    def paced_many(self, messages: list[render.Message], attempts: dict[int, int],
                   stop: list[Outcome], due: float,
                   slot: ratelimit.Slot | None = None) -> list[Outcome]:
        """paced() for one call of many messages: the deadline and its first message's slot
        decide for all; the pacer here books every message's time (a provider that paces at
        the wire books its bulk call's, ratelimit.carrying)."""
        with ratelimit.on_this_thread(slot):
            held = self._hold([m.contact_id for m in messages], stop, due, slot)
            return held if held is not None else self.send_many(messages, attempts, stop)

    def send_many(self, messages: list[render.Message], attempts: dict[int, int],
                  stop: list[Outcome]) -> list[Outcome]:
        """Send a chunk of messages by the provider's send_many (any thread); an outcome per
        message, in order, mapped as send_one maps one call's."""
        if stop:
            return [Outcome(m.contact_id, stop[0].outcome, retry_in=stop[0].retry_in)
                    for m in messages]
        started = time.perf_counter()
        _calling.stop = stop  # read at the wire, after the pacer (at_the_wire)
        try:
            results: list[Any] = list(self.provider.send_many(messages))  # type: ignore[attr-defined]
            if len(results) != len(messages):
                raise errors.OutcomeUnknown(f"the provider answered {len(results)} outcomes "
                                            f"for {len(messages)} messages")
        except Exception as exc:  # noqa: BLE001 - the chunk's outcomes, never the process's
            results = [exc] * len(messages)
        finally:
            _calling.stop = None
        seconds = (time.perf_counter() - started) / len(messages)  # the call's, per message
        outcomes: list[Outcome] = []
        throttle: Outcome | None = None
        sent = False
        for m, result in zip(messages, results, strict=True):
            if isinstance(result, str):
                # positional: a group's worth of these is built per call (issue 32)
                outcomes.append(Outcome(m.contact_id, "sent", result, None, 0.0, None, seconds))
                sent = True
                continue
            outcome = self._failed(m.contact_id, result, attempts, stop, throttle)
            if outcome.outcome == "throttled" and throttle is None:
                throttle = outcome
            if isinstance(result, errors.Stopped):
                outcomes.append(outcome)  # never called: no time to count
                continue
            outcome.seconds = seconds
            outcomes.append(outcome)
        if sent:
            self._throttles = 0
        return outcomes


CHUNK_BYTES = 10 * 1024 * 1024  # request bytes one chunk may reach, about (SES: 40 MB)


def message_bytes(message: render.Message) -> int:
    """At most about the bytes a message adds to a bulk request: its parts and headers in
    JSON inside JSON (an ASCII character up to 2 bytes once escaped twice; any other up to
    14: a surrogate pair of \\uXXXX), and a little for the entry's frame."""
    size = 256
    for part in (message.subject, message.text, message.html, *message.headers,
                 *message.headers.values()):
        if part:
            size += len(part) * (2 if part.isascii() else 14)  # isascii(): O(1) for str
    return size


def chunks(rows: list[int], messages: list[render.Message], most: int,
           most_bytes: int = CHUNK_BYTES) -> list[list[int]]:
    """The rows in order, in chunks of at most `most` and about `most_bytes` (a message
    bigger than that alone)."""
    out: list[list[int]] = []
    size = 0
    for row, message in zip(rows, messages, strict=True):
        n = message_bytes(message)
        if not out or len(out[-1]) >= most or size + n > most_bytes:
            out.append([])
            size = 0
        out[-1].append(row)
        size += n
    return out


def _spread(rows: list[int], futures: list[asyncio.Future[Outcome]]
            ) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback for a chunk's call: each row's future gets its outcome (or the
    call's cancellation or exception: the row is abandoned, as one call's would be)."""

    def done(call: asyncio.Future[Any]) -> None:
        if call.cancelled():
            for row in rows:
                futures[row].cancel()
            return
        exc = call.exception()
        result = call.result() if exc is None else None
        outcomes = result if isinstance(result, list) else [result] * len(rows)
        for row, outcome in zip(rows, outcomes, strict=True):
            if futures[row].done():
                continue  # cancelled meanwhile (the group was abandoned)
            if exc is not None:
                futures[row].set_exception(exc)
            else:
                futures[row].set_result(outcome)

    return done


def text_array(values: Sequence[str | None]) -> str:
    """A text[] parameter as one array literal, which the server parses: psycopg adapts a list
    element by element in Python (measured, a record's five lists of 500: 4.7 µs of the
    worker's CPU per recipient; as literals 0.3 µs). Every element is double-quoted with its
    backslashes and double quotes escaped (PostgreSQL's array input syntax), so any text
    round-trips; None is NULL. A list of NULLs, or of texts with nothing to escape, is
    joined in one pass (issue 32)."""
    if not values:
        return "{}"
    nulls = values.count(None)
    if nulls == len(values):
        return "{" + ",".join(["NULL"] * nulls) + "}"
    if not nulls:
        texts = cast("Sequence[str]", values)
        plain = ",".join(texts)
        if '"' not in plain and "\\" not in plain:
            return '{"' + '","'.join(texts) + '"}'
    return "{" + ",".join(
        "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        for v in values) + "}"


def number_array(values: Sequence[int] | Sequence[float]) -> str:
    """A bigint[] or double precision[] parameter as one array literal (see text_array);
    all zeros (a group's retry delays, mostly) without a repr each (issue 32)."""
    if not any(values):
        return "{" + ",".join(["0"] * len(values)) + "}"
    return "{" + ",".join(map(repr, values)) + "}"


_COLUMNS = operator.attrgetter("contact_id", "outcome", "message_id", "error", "retry_in")


def record_params(bid: Any, token: Any, outcomes: list[Outcome],
                  breaker: int) -> dict[str, Any]:
    """The `record` statement's parameters for one group, its arrays as literals (the
    outcomes' five columns read in one pass)."""
    ids, kinds, message_ids, errors_, retry_in = (
        zip(*map(_COLUMNS, outcomes), strict=True) if outcomes else ((), (), (), (), ()))
    return {"id": bid, "token": token,
            "ids": number_array(ids),
            "outcomes": text_array(kinds),
            "message_ids": text_array(message_ids),
            "errors": text_array(errors_),
            "retry_in": number_array(retry_in),
            "breaker": breaker}
