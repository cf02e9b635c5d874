-- The current schema: what 0001_init and every later migration add up to (a test checks).
-- Contacts, broadcasts, the recipient snapshot (one partition per broadcast, 0002, each
-- with its own primary key, 0003), the rate bucket, and the versioned functions that make every state change one atomic step.
--
-- Lock order (deadlock freedom):
-- 1. a transaction that locks both a broadcast row and some of its recipient rows locks
--    the broadcast row FIRST (the worker's handoff reads the broadcast without locking it);
-- 2. a statement that locks several recipient rows locks them in (broadcast_id, contact_id)
--    order, through `SELECT ... ORDER BY ... FOR UPDATE` (LockRows runs above the Sort).
-- Plan shape: the locked keys are gathered into an array first (`= ANY (ARRAY(...))`, an
-- InitPlan run once) and the update then finds each row by primary key. A join with the
-- locked set instead lets a planner with stale statistics (a new broadcast id it has never
-- seen: estimated 1 row, really 1,000,000) put the whole broadcast on the outer side of a
-- nested loop: measured, a sweep ran 10 minutes holding the broadcast row.
-- Claims use SKIP LOCKED and never wait.

CREATE TABLE contacts (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account         text        NOT NULL,
    email           text        NOT NULL,
    name            text        NOT NULL DEFAULT '',
    tags            text[]      NOT NULL DEFAULT '{}',
    unsubscribed_at timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- custom fields for merge tags: a flat JSON object (0004)
    attributes        jsonb       NOT NULL DEFAULT '{}',
    -- not mailable after a hard bounce, repeated soft bounces or a complaint (0004)
    suppressed_at     timestamptz,
    suppressed_reason text,
    suppressed_detail text,
    soft_bounces      integer     NOT NULL DEFAULT 0,
    CONSTRAINT contacts_attributes_check CHECK (jsonb_typeof(attributes) = 'object'),
    CONSTRAINT contacts_suppressed_reason_check
        CHECK (suppressed_reason IN ('bounce', 'soft_bounce', 'complaint')),
    CONSTRAINT contacts_suppressed_check
        CHECK ((suppressed_at IS NULL) = (suppressed_reason IS NULL))
);
CREATE UNIQUE INDEX contacts_account_email ON contacts (account, lower(email));
CREATE INDEX contacts_tags ON contacts USING gin (tags);
CREATE INDEX contacts_suppressed ON contacts (account, suppressed_at)
    WHERE suppressed_at IS NOT NULL;

-- Every unsubscribe, resubscribe, suppression and unsuppression of a contact, appended,
-- with where it came from (source) and who did it (actor) (0004).
CREATE TABLE contact_events (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account      text        NOT NULL,
    contact_id   bigint      NOT NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    action       text        NOT NULL
        CHECK (action IN ('unsubscribe', 'resubscribe', 'suppress', 'unsuppress',
                          'soft_bounce', 'erase')),
    -- where it came from: one-click, api, cli, import, ses, sql
    source       text        NOT NULL CHECK (source <> ''),
    -- who: {"via": "api", "sub": ...}, {"via": "cli", "user": ..., "host": ...}, ...
    actor        jsonb       NOT NULL DEFAULT '{}',
    broadcast_id uuid,
    details      jsonb       NOT NULL DEFAULT '{}'
);
CREATE INDEX contact_events_contact ON contact_events (account, contact_id, at);

CREATE TABLE broadcasts (
    id               uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account          text        NOT NULL,
    status           text        NOT NULL DEFAULT 'draft',
    -- bumped by resume: work claimed under an older epoch can never be handed off
    epoch            integer     NOT NULL DEFAULT 1,
    subject          text        NOT NULL,
    from_address     text        NOT NULL,
    text_body        text,
    html_body        text,
    segment_tag      text,
    -- per-broadcast cap in emails/s under the global limit; NULL = global limit only
    rate_limit       double precision CHECK (rate_limit IS NULL OR rate_limit > 0),
    -- counters: changed in the same transaction as the recipient rows they count
    total            integer     NOT NULL DEFAULT 0,
    sent             integer     NOT NULL DEFAULT 0,
    failed           integer     NOT NULL DEFAULT 0,
    skipped          integer     NOT NULL DEFAULT 0,
    unknown          integer     NOT NULL DEFAULT 0,
    cancelled        integer     NOT NULL DEFAULT 0,
    -- consecutive failed handoffs, for the circuit breaker
    failure_streak   integer     NOT NULL DEFAULT 0,
    paused_reason    text,
    audit_log        jsonb       NOT NULL DEFAULT '[]',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    CHECK (text_body IS NOT NULL OR html_body IS NOT NULL),
    -- a scheduled start and an optional latest start (0004)
    scheduled_at     timestamptz,
    not_after        timestamptz,
    -- delivery feedback counters (0004)
    delivered        integer     NOT NULL DEFAULT 0,
    bounced          integer     NOT NULL DEFAULT 0,
    complained       integer     NOT NULL DEFAULT 0,
    -- weight within the account's share of the rate (0004)
    priority         smallint    NOT NULL DEFAULT 1,
    CONSTRAINT broadcasts_status_check
        CHECK (status IN ('draft', 'scheduled', 'sending', 'paused', 'sent', 'failed',
                          'cancelled')),
    CONSTRAINT broadcasts_priority_check CHECK (priority BETWEEN 1 AND 10),
    CONSTRAINT broadcasts_scheduled_check
        CHECK (status <> 'scheduled' OR scheduled_at IS NOT NULL),
    CONSTRAINT broadcasts_not_after_check
        CHECK (not_after IS NULL OR scheduled_at IS NULL OR not_after >= scheduled_at)
);
CREATE INDEX broadcasts_account_created ON broadcasts (account, created_at DESC, id DESC);
CREATE INDEX broadcasts_active ON broadcasts (status) WHERE status IN ('sending', 'paused');
-- the scheduled broadcasts whose time has come, in time order: O(due) for the sweeper
CREATE INDEX broadcasts_scheduled ON broadcasts (scheduled_at) WHERE status = 'scheduled';

-- The snapshot. No foreign keys: a 1,000,000-row snapshot would pay one lookup per row,
-- and a broadcast with recipients is never deleted (only drafts are).
-- One partition per broadcast, named by pgcast_partition_name_v1 (storage parameters are
-- set on each partition: a partitioned table has no storage of its own).
CREATE TABLE broadcast_recipients (
    broadcast_id        uuid        NOT NULL,
    contact_id          bigint      NOT NULL,
    email               text        NOT NULL,
    status              text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'claimed', 'sending', 'sent', 'failed', 'skipped',
                          'unknown', 'cancelled')),
    attempts            smallint    NOT NULL DEFAULT 0,
    retry_at            timestamptz,  -- not claimable before this; NULL = now
    claim_token         uuid,
    claim_epoch         integer,
    worker              text,
    lease_expires_at    timestamptz,
    -- start of the handoff statement that moved this row to sending: its snapshot is later
    handed_at           timestamptz,
    provider_message_id text,
    last_error          text,
    sent_at             timestamptz,
    -- delivery feedback: annotations, not dispatch states (0004)
    delivered_at        timestamptz,
    bounced_at          timestamptz,
    complained_at       timestamptz,
    -- worker is set by a row's first claim and never cleared: NULL means never claimed
    CONSTRAINT broadcast_recipients_claimed_check
        CHECK (worker IS NOT NULL OR status IN ('pending', 'cancelled'))
) PARTITION BY LIST (broadcast_id);
-- No primary key here: each partition has its own, (contact_id), built after the snapshot's
-- rows are in (pgcast_partition_attach_v2). A key on this table would have to include
-- broadcast_id, which is the same in every row of a partition: twice as wide to build.
-- A row whose worker is NULL was never claimed ("fresh"). A fresh pending row is found by walking the partition's key from a worker's cursor; every
-- row in flight, requeued, failed, unknown or skipped has been claimed, so the partial
-- indexes test worker IS NOT NULL first: a fresh row fails at once, and a 1,000,000-row
-- snapshot does not pay for status comparisons. A query that wants one of them says
-- worker IS NOT NULL too (the planner uses a partial index only when the query implies it).
-- recipients back to pending after a claim, by the time they become due (NULL: now): what
-- a claim takes before fresh rows, reading only the part that is due (0005)
CREATE INDEX broadcast_recipients_requeued ON broadcast_recipients
    ((coalesce(retry_at, '-infinity'::timestamptz)), contact_id)
    WHERE worker IS NOT NULL AND status = 'pending';
-- the recipients a person looks for (API ?status= filter)
CREATE INDEX broadcast_recipients_problems ON broadcast_recipients (broadcast_id, status, contact_id)
    WHERE worker IS NOT NULL AND status IN ('failed', 'unknown', 'skipped');
-- what is in a worker's hands, for leases, pause, cancel and the drained check
CREATE INDEX broadcast_recipients_in_flight ON broadcast_recipients (broadcast_id, contact_id)
    WHERE worker IS NOT NULL AND status IN ('claimed', 'sending');

-- the partition that holds one broadcast's recipients, schema-qualified and quoted: it lives
-- in broadcast_recipients' schema, whatever the caller's search_path
CREATE FUNCTION pgcast_partition_name_v1(p_id uuid)
RETURNS text LANGUAGE sql STABLE AS $$
    SELECT format('%s.%I', c.relnamespace::regnamespace,
                  'broadcast_recipients_' || replace(p_id::text, '-', ''))
    FROM pg_class c WHERE c.oid = 'broadcast_recipients'::regclass
$$;

-- attach a filled partition: its primary key in one sorted pass, then ATTACH, which finds
-- every index of the parent already there and, thanks to the CHECK, does not scan the rows
CREATE FUNCTION pgcast_partition_attach_v2(p_id uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
BEGIN
    EXECUTE format('ALTER TABLE %s ADD PRIMARY KEY (contact_id)', part);
    EXECUTE format('ALTER TABLE broadcast_recipients ATTACH PARTITION %s FOR VALUES IN (%L)',
                   part, p_id);
END
$$;

-- fresh planner statistics for one broadcast's partition (after a big snapshot). A sample
-- of 3,000 rows (statistics target 10) is enough: what the plans need is the partition's
-- size and that contact_id is unique and status all pending, and the send waits for it.
-- Autovacuum's analyze refreshes them later at the default target.
CREATE FUNCTION pgcast_analyze_v1(p_id uuid)
RETURNS void LANGUAGE plpgsql
SET default_statistics_target = 10
AS $$
BEGIN
    IF to_regclass(pgcast_partition_name_v1(p_id)) IS NOT NULL THEN
        EXECUTE format('ANALYZE %s', pgcast_partition_name_v1(p_id));
    END IF;
END
$$;

-- Token buckets for the rate limit. 'global' caps every worker; 'broadcast:<id>' rows cap
-- one broadcast further.
CREATE TABLE rate_limits (
    name        text             PRIMARY KEY,
    rate        double precision NOT NULL CHECK (rate >= 0),   -- emails per second, 0 = unlimited
    burst       double precision NOT NULL CHECK (burst >= 1),  -- bucket size, emails
    tokens      double precision NOT NULL,
    refilled_at timestamptz      NOT NULL DEFAULT clock_timestamp(),
    updated_at  timestamptz      NOT NULL DEFAULT now()
);
INSERT INTO rate_limits (name, rate, burst, tokens) VALUES ('global', 0, 1, 1);

CREATE VIEW broadcast_progress AS
SELECT id AS broadcast_id,
       account,
       status,
       total,
       total - sent - failed - skipped - unknown - cancelled AS pending,
       sent,
       failed,
       skipped,
       unknown,
       cancelled,
       epoch,
       paused_reason,
       created_at,
       started_at,
       finished_at,
       scheduled_at,
       delivered,
       bounced,
       complained
FROM broadcasts;

-- One audit entry.
CREATE FUNCTION pgcast_audit_v1(p_action text, p_from text, p_to text, p_details jsonb)
RETURNS jsonb LANGUAGE sql VOLATILE AS $$
    SELECT jsonb_build_array(jsonb_build_object(
        'action', p_action, 'from', p_from, 'to', p_to,
        'at', to_jsonb(clock_timestamp()), 'details', coalesce(p_details, '{}'::jsonb)))
$$;

-- Control events for the workers (cancel, pause, resume, send, rate). Never per email.
CREATE FUNCTION pgcast_notify_v1(p_event text, p_broadcast uuid, p_epoch integer)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('pgcast_control', json_build_object(
        'event', p_event, 'broadcast', p_broadcast, 'epoch', p_epoch)::text)
$$;

-- resume: paused -> sending, bumping the epoch (fences work claimed before the pause).
CREATE FUNCTION pgcast_resume_v1(p_account text, p_id uuid, p_details jsonb)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    e integer;
BEGIN
    UPDATE broadcasts AS u
    SET status = 'sending', epoch = u.epoch + 1, paused_reason = NULL, failure_streak = 0,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('resume', u.status, 'sending', p_details)
    WHERE u.id = p_id AND u.account = p_account AND u.status = ANY (ARRAY['paused'])
    RETURNING u.epoch INTO e;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status FROM broadcasts b
            WHERE b.id = p_id AND b.account = p_account;
        RETURN;
    END IF;
    PERFORM pgcast_notify_v1('resume', p_id, e);
    RETURN QUERY SELECT true, 'sending'::text;
END
$$;

-- the lowest fresh contact_id >= p_from, or NULL: a plain read, so a fresh row that another
-- transaction has locked (a claim about to commit, or one about to roll back) counts. Rows
-- never become fresh again, so a worker that found no fresh row after its cursor learns
-- from this where the fresh rows it walked past (locked by a transaction that then rolled
-- back) begin, and that none is left once it returns NULL.
CREATE FUNCTION pgcast_fresh_floor_v1(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN (SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
              AND l.contact_id >= p_from
            ORDER BY l.contact_id
            LIMIT 1);
END
$$;

-- take tokens: up to p_want from bucket p_name. Serialised by an advisory lock; the
-- refill reads clock_timestamp() after the lock (now() is the transaction's start).
-- wait_seconds tells an empty-handed caller how long until one token is there.
CREATE FUNCTION pgcast_take_tokens_v1(p_name text, p_want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    g integer;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    g := greatest(0, least(p_want, floor(have)::integer));
    UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
    RETURN QUERY SELECT g, CASE WHEN g > 0 THEN 0.0 ELSE (1 - (have - g)) / b.rate END;
END
$$;

-- drain: a provider throttle empties the bucket for p_seconds of its rate. Under the same
-- lock as the takers, and idempotent: N workers throttled at once wait p_seconds, not N times.
CREATE FUNCTION pgcast_drain_tokens_v1(p_name text, p_seconds double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    t := clock_timestamp();
    UPDATE rate_limits
    SET tokens = least(burst, tokens + greatest(0, extract(epoch FROM t - refilled_at)) * rate,
                       -rate * p_seconds),
        refilled_at = t
    WHERE name = p_name AND rate > 0;
END
$$;

-- Any change to a bucket's rate or burst (pgcast rate set, or a DBA's UPDATE) tells the
-- workers at once.
CREATE FUNCTION pgcast_rate_changed_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgcast_control', json_build_object(
        'event', 'rate', 'bucket', NEW.name, 'rate', NEW.rate, 'burst', NEW.burst)::text);
    RETURN NEW;
END
$$;
CREATE TRIGGER rate_limits_changed AFTER INSERT OR UPDATE OF rate, burst ON rate_limits
    FOR EACH ROW EXECUTE FUNCTION pgcast_rate_changed_v1();

-- renew: a live worker extends the lease of the claims it knows it holds, by (broadcast,
-- claim token) pairs, so a claim whose answer was lost to a broken connection still
-- expires. One broadcast at a time, each one's rows locked in contact_id order.
-- v3: finds them through 0003's in-flight index (worker IS NOT NULL).
CREATE FUNCTION pgcast_renew_v3(p_ids uuid[], p_tokens uuid[], p_lease interval)
RETURNS integer LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    c record;
    n integer;
    total integer := 0;
BEGIN
    FOR c IN SELECT t.id, array_agg(t.token) AS tokens
             FROM unnest(p_ids, p_tokens) AS t(id, token) GROUP BY t.id ORDER BY t.id LOOP
        UPDATE broadcast_recipients r
        SET lease_expires_at = clock_timestamp() + p_lease
        WHERE r.broadcast_id = c.id AND r.contact_id = ANY (ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = c.id AND l.worker IS NOT NULL
              AND l.status IN ('claimed', 'sending') AND l.claim_token = ANY (c.tokens)
            ORDER BY l.contact_id FOR UPDATE));
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;

-- record: one group's provider outcomes and the broadcast's counters, in one transaction.
-- The rows are locked first (contact_id order) and the outcomes reach them through a hash
-- join, linear in the group's size (v1 put the unnest() on the inner side of a nested loop).
-- v3: a retry, throttle or release that arrives after the broadcast finished (the sweeper
-- had counted the row unknown when its worker's lease ran out, and the broadcast was then
-- finalized) ends the row failed, counted: v2 put it back to pending in a finished broadcast,
-- where nothing would ever take it. Counters now follow the rows' new statuses.
-- v4: a late `sent` for a broadcast that finished failed (no row was known sent: 0005's
-- finalize) turns it sent, with an audit entry.
CREATE FUNCTION pgcast_record_v4(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
                                 p_message_ids text[], p_errors text[], p_retry_in double precision[],
                                 p_breaker integer)
RETURNS TABLE (recorded integer, tripped boolean)
LANGUAGE plpgsql
SET enable_nestloop = off
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    locked bigint[];
    was_unknown integer;
    c record;
    streak integer;
    st text;
    is_cancelled boolean;
    is_finished boolean;
BEGIN
    -- Not worth an fsync, and it must not hold the broadcast row through one (every worker's
    -- record queues on that row): a record lost to a server crash leaves its rows sending,
    -- and the sweeper turns them unknown: never re-sent. The handoff stays synchronous.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- lock order; a broadcast cancelled while this group was in the provider's hands gets
    -- its unsent rows as cancelled (a cancel only sees pending and claimed rows), and one
    -- that finished meanwhile gets them as failed
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_id FOR NO KEY UPDATE;
    is_cancelled := st = 'cancelled';
    is_finished := st IN ('sent', 'failed');
    -- the rows this claim still holds; those the sweeper already counted unknown are
    -- corrected by their late outcome
    SELECT coalesce(array_agg(l.contact_id), '{}'), count(*) FILTER (WHERE l.status = 'unknown')
    INTO locked, was_unknown
    FROM (SELECT r.contact_id, r.status FROM broadcast_recipients r
          WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids) AND r.claim_token = p_token
            AND r.status IN ('sending', 'unknown')
          ORDER BY r.contact_id
          FOR UPDATE) l;
    WITH upd AS (
        UPDATE broadcast_recipients r
        SET status = CASE WHEN res.outcome IN ('sent', 'failed', 'unknown') THEN res.outcome
                          WHEN is_cancelled THEN 'cancelled'
                          WHEN is_finished THEN 'failed'
                          ELSE 'pending' END,
            attempts = r.attempts + CASE WHEN res.outcome IN ('sent', 'failed', 'retry', 'unknown')
                                         THEN 1 ELSE 0 END,
            provider_message_id = res.message_id,
            last_error = CASE WHEN is_finished AND res.outcome NOT IN ('sent', 'failed', 'unknown')
                              THEN 'broadcast finished before the ' || res.outcome
                                   || coalesce(': ' || res.error, '')
                              ELSE res.error END,
            sent_at = CASE WHEN res.outcome = 'sent' THEN now() END,
            retry_at = CASE WHEN res.outcome IN ('retry', 'throttled') AND st IN ('sending', 'paused')
                            THEN clock_timestamp() + make_interval(secs => res.retry_in)
                            ELSE r.retry_at END,
            claim_token = CASE WHEN res.outcome IN ('sent', 'failed', 'unknown')
                               THEN r.claim_token END,
            lease_expires_at = NULL
        FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
            AS res(contact_id, outcome, message_id, error, retry_in)
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (locked)
          AND r.contact_id = res.contact_id
        RETURNING res.outcome, r.status
    )
    SELECT count(*) AS n,
           count(*) FILTER (WHERE status = 'sent') AS n_sent,
           count(*) FILTER (WHERE status = 'failed') AS n_failed,
           count(*) FILTER (WHERE status = 'unknown') AS n_unknown,
           count(*) FILTER (WHERE outcome IN ('retry', 'failed')) AS n_bad,
           count(*) FILTER (WHERE status = 'cancelled') AS n_cancelled
    INTO c FROM upd;
    UPDATE broadcasts
    SET sent = sent + c.n_sent, failed = failed + c.n_failed,
        -- a late answer that says sent: the broadcast did reach somebody after all
        status = CASE WHEN status = 'failed' AND c.n_sent > 0 THEN 'sent' ELSE status END,
        audit_log = CASE WHEN status = 'failed' AND c.n_sent > 0
                         THEN audit_log || pgcast_audit_v1('late_sent', 'failed', 'sent',
                                                           jsonb_build_object('sent', c.n_sent))
                         ELSE audit_log END,
        unknown = unknown + c.n_unknown - was_unknown, cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN c.n_sent > 0 THEN 0 ELSE failure_streak + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT c.n::integer, p_breaker > 0 AND streak > p_breaker;
END
$$;

-- unhandoff: rows of a claim that reached sending (or were only claimed) but provably never
-- reached the provider: the worker lost the answer of the statement that handed them off.
-- p_ids NULL = every such row of the token (a direct claim_handoff has a single group).
-- Back to pending, or to cancelled (and counted) when the broadcast was cancelled meanwhile:
-- a cancel only sees pending and claimed rows, so these would otherwise stay pending in a
-- cancelled broadcast. Broadcast row first (lock order).
-- v2: finds the rows through 0003's in-flight index (worker IS NOT NULL).
CREATE FUNCTION pgcast_unhandoff_v2(p_id uuid, p_token uuid, p_ids bigint[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    is_cancelled boolean;
    n integer;
BEGIN
    SELECT b.status = 'cancelled' INTO is_cancelled FROM broadcasts b WHERE b.id = p_id
    FOR NO KEY UPDATE;
    UPDATE broadcast_recipients r
    SET status = CASE WHEN is_cancelled THEN 'cancelled' ELSE 'pending' END,
        claim_token = NULL, lease_expires_at = NULL, handed_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND (p_ids IS NULL OR l.contact_id = ANY (p_ids))
          AND l.claim_token = p_token AND l.worker IS NOT NULL
          AND l.status IN ('claimed', 'sending')
        ORDER BY l.contact_id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    IF is_cancelled AND n > 0 THEN
        UPDATE broadcasts SET cancelled = broadcasts.cancelled + n WHERE id = p_id;
    END IF;
    RETURN n;
END
$$;

-- finalize, release and sweep, v2: the same statements as v1 in plpgsql, whose plans are
-- made with the broadcast id known, so they are pruned to its partition. v1 were
-- LANGUAGE sql (planned without the id: every partition opened and locked at each call) or
-- drove their loop with a join over all of them (sweep).

-- release: rows a claim holds but will not hand off go back to pending.
CREATE FUNCTION pgcast_release_v2(p_id uuid, p_token uuid, p_ids bigint[])
RETURNS integer
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    n integer;
BEGIN
    -- lost to a server crash, released rows stay claimed until their lease expires: no fsync
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE broadcast_recipients r
    SET status = 'pending', claim_token = NULL, lease_expires_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids)
          AND l.claim_token = p_token AND l.status = 'claimed'
        ORDER BY l.contact_id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Plans: with one partition per broadcast, a generic plan of a statement on
-- broadcast_recipients covers every partition and locks them all at each execution (run-time
-- pruning happens after the locks), so it slows down as broadcasts accumulate; measured, a
-- 200k drain with 300 earlier broadcasts' partitions ran 12-16% slower. A custom plan is
-- pruned to the one partition while it is planned: the plpgsql functions that touch
-- recipients always plan that way (a LANGUAGE sql function is planned without its
-- arguments and cannot be pruned at all: finalize, release and sweep have a plpgsql v2).

-- 0005_fences ---------------------------------------------------------------------------

-- The contacts fence -----------------------------------------------------------------------

-- a change that makes a contact unmailable (or mailable again) is durable and fenced
CREATE FUNCTION pgcast_contact_fence_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'),
                                  hashtext(CASE WHEN TG_OP = 'DELETE' THEN OLD.account
                                                ELSE NEW.account END));
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER contacts_fence_update
    BEFORE UPDATE OF unsubscribed_at, suppressed_at ON contacts
    FOR EACH ROW
    WHEN (OLD.unsubscribed_at IS DISTINCT FROM NEW.unsubscribed_at
          OR OLD.suppressed_at IS DISTINCT FROM NEW.suppressed_at)
    EXECUTE FUNCTION pgcast_contact_fence_v1();
CREATE TRIGGER contacts_fence_delete
    BEFORE DELETE ON contacts
    FOR EACH ROW EXECUTE FUNCTION pgcast_contact_fence_v1();

-- Partitions: the requeued index keyed by due time -----------------------------------------

-- the partial indexes of one broadcast's partition, under the names the parent's indexes
-- adopt at ATTACH: empty on a new partition (a fresh row fails worker IS NOT NULL).
-- v2: the requeued index is keyed by when a row becomes due, so a claim reads due rows only.
CREATE FUNCTION pgcast_partition_indexes_v2(p_id uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
    bare text := 'broadcast_recipients_' || replace(p_id::text, '-', '');
BEGIN
    EXECUTE format('CREATE INDEX %I ON %s'
                   ' ((coalesce(retry_at, ''-infinity''::timestamptz)), contact_id)'
                   ' WHERE worker IS NOT NULL AND status = ''pending''', bare || '_requeued', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, status, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''failed'', ''unknown'', ''skipped'')',
                   bare || '_problems', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''claimed'', ''sending'')',
                   bare || '_in_flight', part);
END
$$;

-- a new, unattached partition for one broadcast (as v2, with pgcast_partition_indexes_v2)
CREATE FUNCTION pgcast_partition_create_v3(p_id uuid)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
    bare text := 'broadcast_recipients_' || replace(p_id::text, '-', '');
BEGIN
    EXECUTE format(
        'CREATE TABLE %s (LIKE broadcast_recipients INCLUDING DEFAULTS INCLUDING CONSTRAINTS,'
        ' CONSTRAINT %I CHECK (broadcast_id = %L)) WITH ('
        -- No status change is HOT (status is in the partial indexes' predicates), so free
        -- space kept for updates only makes the snapshot write more pages: fillfactor 100.
        -- Each recipient leaves two or three dead versions: vacuum and analyze after 2% of
        -- the partition instead of the default 20%, at ten times the default cost limit.
        '  fillfactor = 100,'
        '  autovacuum_vacuum_scale_factor = 0.02,'
        '  autovacuum_vacuum_threshold = 10000,'
        '  autovacuum_vacuum_insert_scale_factor = 0.02,'
        '  autovacuum_analyze_scale_factor = 0.02,'
        '  autovacuum_analyze_threshold = 10000,'
        '  autovacuum_vacuum_cost_limit = 2000)',
        part, bare || '_broadcast', p_id);
    PERFORM pgcast_partition_indexes_v2(p_id);
    RETURN part;
END
$$;

-- Send -------------------------------------------------------------------------------------

-- send: draft|scheduled -> sending, with the snapshot of the mailable contacts of the
-- segment in the broadcast's own partition, in one transaction. Nobody to send to: refused
-- with status 'empty' and nothing changed, unless p_allow_empty (then 'sent' at once).
-- p_details joins the audit entry (who sent it, a schedule's lateness).
CREATE FUNCTION pgcast_send_v4(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
                               p_details jsonb DEFAULT '{}')
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
BEGIN
    -- an acknowledged send is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status NOT IN ('draft', 'scheduled') THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    part := pgcast_partition_create_v3(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked) and contacts.id is
    -- unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $1, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL'
        '   AND ($3::text IS NULL OR c.tags @> ARRAY[$3::text])', part)
        USING p_id, p_account, b.segment_tag;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgcast_partition_attach_v2(p_id);
    ELSE
        EXECUTE format('DROP TABLE %s', part);  -- nobody to send to: no partition
        IF NOT p_allow_empty THEN
            RETURN QUERY SELECT false, 'empty'::text, 0;
            RETURN;
        END IF;
    END IF;
    IF b.rate_limit IS NOT NULL THEN
        INSERT INTO rate_limits (name, rate, burst, tokens)
        VALUES ('broadcast:' || p_id, b.rate_limit, greatest(1, ceil(b.rate_limit / 10)), 1)
        ON CONFLICT (name) DO NOTHING;
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
        total = n,
        started_at = now(),
        finished_at = CASE WHEN n = 0 THEN now() END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('send', u.status,
            CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
            coalesce(p_details, '{}'::jsonb) || jsonb_build_object('recipients', n))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft', 'scheduled'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

-- Claim ------------------------------------------------------------------------------------

-- the rows a claim takes, locked (SKIP LOCKED: a claim never waits): first recipients back
-- to pending after an earlier claim whose retry time has come, in the order they came due
-- (the requeued index, read only up to now: rows in backoff are never visited), then fresh
-- ones after the worker's cursor (the primary key, in contact_id order). last_fresh: the
-- highest fresh contact_id taken, the cursor when no fresh row was needed, NULL when fresh
-- rows were needed and none was free after the cursor. Index scans only (see v1).
CREATE FUNCTION pgcast_claim_rows_v2(p_id uuid, p_limit integer, p_after bigint,
                                     OUT ids bigint[], OUT last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    fresh bigint[];
BEGIN
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'pending'
          AND coalesce(l.retry_at, '-infinity'::timestamptz) <= now()
        ORDER BY coalesce(l.retry_at, '-infinity'::timestamptz), l.contact_id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED);
    last_fresh := p_after;
    IF cardinality(ids) < p_limit THEN
        fresh := ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
              AND l.contact_id > p_after
            ORDER BY l.contact_id
            LIMIT p_limit - cardinality(ids)
            FOR UPDATE SKIP LOCKED);
        last_fresh := fresh[cardinality(fresh)];
        ids := ids || fresh;
    END IF;
END
$$;

-- claim: up to p_limit claimable rows -> claimed, with a lease. v3: takes the pause fence
-- shared (a pause waits for the claim, then sees its rows and puts them back).
CREATE FUNCTION pgcast_claim_v3(p_id uuid, p_limit integer, p_token uuid, p_worker text,
                                p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, attempts smallint, epoch integer,
               last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    c record;
BEGIN
    -- a claim lost to a server crash leaves its rows pending: its worker's handoff then
    -- fails the fence. Not worth an fsync.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.epoch INTO e FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    c := pgcast_claim_rows_v2(p_id, p_limit, p_after);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'claimed', claim_token = p_token, claim_epoch = e,
        worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, r.attempts, e, c.last_fresh;
END
$$;

-- Handoff ----------------------------------------------------------------------------------

-- handoff: the fence before the provider call. Moves this claim's rows to sending only
-- while the broadcast is still sending at the claim's epoch and the claim's lease holds;
-- rows whose contact is no longer mailable (unsubscribed, suppressed, erased) go to
-- skipped. Returns the rows to send now, with the contact's name and attributes as they
-- are at this moment. Synchronous whatever the configuration; committed by the caller
-- BEFORE the provider is called.
CREATE FUNCTION pgcast_handoff_v2(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    gone bigint[];
    locked bigint[];
    n_skip integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the pause fence (exclusive in pause), before the broadcast is read
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.account INTO acct FROM broadcasts b
    WHERE b.id = p_id AND b.status = 'sending' AND b.epoch = p_epoch;
    IF NOT FOUND THEN
        RETURN;  -- fenced: cancelled, paused or resumed since the claim
    END IF;
    -- the unsubscribe fence (exclusive in every writer of the columns read below), before
    -- the contacts are read: none of them can change until this transaction commits
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    gone := ARRAY(
        SELECT x.id FROM unnest(p_ids) AS x(id) LEFT JOIN contacts k ON k.id = x.id
        WHERE k.id IS NULL OR k.unsubscribed_at IS NOT NULL OR k.suppressed_at IS NOT NULL);
    IF cardinality(gone) > 0 THEN
        -- rare path: it changes a counter, so it takes the broadcast row before the rows
        -- (lock order) and checks the fence again under that lock
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    -- one pass, in contact_id order: this claim's rows whose lease still holds
    locked := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND l.lease_expires_at > clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(gone) > 0 THEN
        UPDATE broadcast_recipients r
        SET status = 'skipped', lease_expires_at = NULL,
            last_error = coalesce((SELECT CASE WHEN k.unsubscribed_at IS NOT NULL
                                               THEN 'unsubscribed'
                                               ELSE 'suppressed: ' || k.suppressed_reason END
                                   FROM contacts k WHERE k.id = r.contact_id),
                                  'contact erased')
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (locked)
          AND r.contact_id = ANY (gone);
        GET DIAGNOSTICS n_skip = ROW_COUNT;
        UPDATE broadcasts SET skipped = skipped + n_skip WHERE id = p_id;
    END IF;
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'sending', handed_at = statement_timestamp()
    FROM contacts c
    WHERE r.broadcast_id = p_id AND c.id = r.contact_id AND r.contact_id = ANY (locked)
      AND NOT (r.contact_id = ANY (gone))
    RETURNING r.contact_id, r.email, c.name, c.attributes;
END
$$;

-- claim and hand off in one statement, for a worker that will send the whole batch at
-- once. Synchronous, like every handoff. Recipients whose contact is no longer mailable
-- are only claimed (handed = false): the worker passes them to pgcast_handoff_v2, whose
-- rare path skips them under the broadcast row lock. Fences: the pause and unsubscribe
-- advisory locks, shared, as in pgcast_handoff_v2; a cancel meets it on the rows.
-- v3: synchronous commit pinned, the unsubscribe fence, suppressed and erased contacts,
-- the contact's attributes (after name).
CREATE FUNCTION pgcast_claim_handoff_v3(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, attempts smallint,
               epoch integer, handed boolean, last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.epoch, b.account INTO e, acct FROM broadcasts b
    WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    c := pgcast_claim_rows_v2(p_id, p_limit, p_after);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name, coalesce(ct.attributes, '{}') AS attributes,
                 ct.id IS NOT NULL AND ct.unsubscribed_at IS NULL AND ct.suppressed_at IS NULL
                     AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, r.attempts, e, k.mailable,
              c.last_fresh;
END
$$;

-- Cancel and pause: synchronous whatever the configuration ----------------------------------

-- cancel: draft|scheduled|sending|paused -> cancelled. Recipients not yet handed off end
-- cancelled. already_queued = recipients the provider had or has (sent, in flight,
-- unknown). v3: synchronous commit pinned; a scheduled broadcast can be cancelled.
CREATE FUNCTION pgcast_cancel_v3(p_account text, p_id uuid, p_details jsonb)
RETURNS TABLE (ok boolean, status text, already_queued integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    n integer;
    in_flight integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    UPDATE broadcasts AS u
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('cancel', u.status, 'cancelled', p_details)
    WHERE u.id = p_id AND u.account = p_account
      AND u.status = ANY (ARRAY['draft', 'scheduled', 'sending', 'paused']);
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status, b.sent + b.unknown
            FROM broadcasts b WHERE b.id = p_id AND b.account = p_account;
        RETURN;
    END IF;
    UPDATE broadcast_recipients r
    SET status = 'cancelled', claim_token = NULL, lease_expires_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.status IN ('pending', 'claimed')
        ORDER BY l.contact_id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    SELECT count(*) INTO in_flight FROM broadcast_recipients r
    WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL AND r.status = 'sending';
    PERFORM pgcast_notify_v1('cancel', p_id, NULL);
    RETURN QUERY
    UPDATE broadcasts AS u SET cancelled = u.cancelled + n
    WHERE u.id = p_id
    RETURNING true, u.status, u.sent + u.unknown + in_flight;
END
$$;

-- pause: sending -> paused; claimed rows go back to pending. Takes the pause fence
-- exclusively (every claim and handoff takes it shared). v4: synchronous commit pinned.
CREATE FUNCTION pgcast_pause_v4(p_account text, p_id uuid, p_reason text, p_details jsonb)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.handoff'), hashtext(p_id::text));
    UPDATE broadcasts AS u
    SET status = 'paused', paused_reason = p_reason, updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('pause', u.status, 'paused',
            coalesce(p_details, '{}'::jsonb) || jsonb_build_object('reason', p_reason))
    WHERE u.id = p_id AND (p_account IS NULL OR u.account = p_account)
      AND u.status = ANY (ARRAY['sending'])
    RETURNING u.epoch INTO e;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status FROM broadcasts b
            WHERE b.id = p_id AND (p_account IS NULL OR b.account = p_account);
        RETURN;
    END IF;
    UPDATE broadcast_recipients r
    SET status = 'pending', claim_token = NULL, lease_expires_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'claimed'
        ORDER BY l.contact_id FOR UPDATE));
    PERFORM pgcast_notify_v1('pause', p_id, e);
    RETURN QUERY SELECT true, 'paused'::text;
END
$$;

-- Finalize and sweep ------------------------------------------------------------------------

-- finalize: sending -> sent|failed once nothing is pending, claimed or sending (see v3 for
-- the order of the checks). v4: a broadcast that reached nobody (no row sent, some failed
-- or unknown) ends failed; one whose recipients were all skipped ends sent, and its audit
-- entry says so.
CREATE FUNCTION pgcast_finalize_v4(p_id uuid)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM broadcast_recipients r
               WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                 AND r.status IN ('claimed', 'sending'))
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status = 'pending') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM broadcast_recipients r
               WHERE r.broadcast_id = p_id AND r.status = 'pending' AND r.worker IS NULL) THEN
        RETURN QUERY SELECT false, 'sending'::text;
        RETURN;
    END IF;
    PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending' FOR NO KEY UPDATE;
    IF NOT FOUND
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status IN ('claimed', 'sending'))
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status = 'pending') THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0 THEN 'failed' ELSE 'sent' END,
        finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('finish', u.status,
            CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0 THEN 'failed' ELSE 'sent' END,
            jsonb_build_object('sent', u.sent, 'failed', u.failed, 'skipped', u.skipped,
                               'unknown', u.unknown)
            || CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0
                    THEN jsonb_build_object('message', 'no recipient was sent')
                    WHEN u.sent = 0 AND u.skipped > 0
                    THEN jsonb_build_object('message', 'every recipient was skipped '
                         '(unsubscribed, suppressed or erased since the snapshot)')
                    ELSE '{}'::jsonb END)
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sending'])
    RETURNING true, u.status;
END
$$;

-- sweep one broadcast, in its own transaction (the caller's): expired claims back to
-- pending, expired handoffs to unknown (never re-sent), finalized when its counters
-- account for every recipient. The broadcast row first, then its expired rows of both
-- kinds in ONE pass in contact_id order (renew's order: v3 took claimed rows, then
-- sending rows, and a renew holding a sending row below a claimed one made a cycle).
-- A cancelled broadcast is visited only while its counters say rows are still in flight.
CREATE FUNCTION pgcast_sweep_one_v1(p_id uuid)
RETURNS TABLE (broadcast_id uuid, reclaimed integer, unknown integer, finalized text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    expired bigint[];
    n_re integer;
    n_unk integer;
    fin text;
    left_over integer;
BEGIN
    PERFORM 1 FROM broadcasts b
    WHERE b.id = p_id
      AND (b.status IN ('sending', 'paused')
           OR (b.status = 'cancelled'
               AND b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled > 0))
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    expired := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL
          AND l.status IN ('claimed', 'sending') AND l.lease_expires_at < clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    WITH upd AS (
        UPDATE broadcast_recipients r
        SET status = CASE WHEN r.status = 'claimed' THEN 'pending' ELSE 'unknown' END,
            claim_token = CASE WHEN r.status = 'claimed' THEN NULL ELSE r.claim_token END,
            lease_expires_at = CASE WHEN r.status = 'claimed' THEN NULL
                                    ELSE r.lease_expires_at END,
            last_error = CASE WHEN r.status = 'claimed' THEN r.last_error
                              ELSE 'worker lost during handoff: outcome unknown' END
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (expired)
        RETURNING r.status
    )
    SELECT count(*) FILTER (WHERE u.status = 'pending'),
           count(*) FILTER (WHERE u.status = 'unknown')
    INTO n_re, n_unk FROM upd u;
    IF n_unk > 0 THEN
        UPDATE broadcasts b SET unknown = b.unknown + n_unk WHERE b.id = p_id;
    END IF;
    SELECT b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled
    INTO left_over FROM broadcasts b WHERE b.id = p_id;
    fin := NULL;
    IF left_over <= 0 THEN
        SELECT f.status INTO fin FROM pgcast_finalize_v4(p_id) f WHERE f.ok;
    END IF;
    IF n_re > 0 OR n_unk > 0 OR fin IS NOT NULL THEN
        RETURN QUERY SELECT p_id, n_re, n_unk, fin;
    END IF;
END
$$;

-- 0006_content
CREATE TABLE unsubscribe_keys (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    secret     text        NOT NULL
        DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO unsubscribe_keys DEFAULT VALUES;

-- Test sends: the rendered message of a broadcast sent to a few chosen addresses, delivered
-- by a running worker (procrastinate task pgcast.test_send), not counted in progress.
CREATE TABLE test_sends (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       text        NOT NULL,
    broadcast_id  uuid        NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    to_address    text        NOT NULL,
    contact_email text,
    status        text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'sending', 'sent', 'failed')),
    message_id    text,
    error         text,
    requested_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz
);
CREATE INDEX test_sends_account ON test_sends (account, requested_at);

-- Queue test sends to p_to (each an address) unless the account would pass p_cap in the
-- last hour; appends a 'test' entry to the broadcast's audit log. ok=false with found=false:
-- no such broadcast; with found=true: over the cap (ids empty, nothing changed).
CREATE FUNCTION pgcast_test_send_v1(p_account text, p_id uuid, p_to text[], p_contact text,
                                    p_cap integer)
RETURNS TABLE (ok boolean, found boolean, recent integer, ids bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n integer;
    made bigint[];
BEGIN
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, 0, '{}'::bigint[];
        RETURN;
    END IF;
    -- one account's requests count one at a time, so two at once cannot both pass the cap
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.test_send'), hashtext(p_account));
    SELECT count(*) INTO n FROM test_sends t
    WHERE t.account = p_account AND t.requested_at > clock_timestamp() - interval '1 hour';
    IF n + cardinality(p_to) > p_cap THEN
        RETURN QUERY SELECT false, true, n, '{}'::bigint[];
        RETURN;
    END IF;
    WITH ins AS (
        INSERT INTO test_sends (account, broadcast_id, to_address, contact_email)
        SELECT p_account, p_id, a, p_contact FROM unnest(p_to) AS a
        RETURNING test_sends.id
    )
    SELECT array_agg(ins.id ORDER BY ins.id) INTO made FROM ins;
    UPDATE broadcasts b
    SET audit_log = b.audit_log || pgcast_audit_v1('test', st, st, jsonb_build_object(
        'to', to_jsonb(p_to), 'contact', p_contact, 'test_sends', to_jsonb(made)))
    WHERE b.id = p_id;
    RETURN QUERY SELECT true, true, n, made;
END
$$;
