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

-- Send: pgcast_send_v5 (0012, at the end) -------------------------------------------------

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
-- are at this moment (name, attributes, tags: what merge tags read). Synchronous whatever the configuration; committed by the caller
-- BEFORE the provider is called.
CREATE FUNCTION pgcast_handoff_v2(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[])
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
    RETURNING r.contact_id, r.email, c.name, c.attributes, c.tags;
END
$$;

-- claim and hand off in one statement, for a worker that will send the whole batch at
-- once. Synchronous, like every handoff. Recipients whose contact is no longer mailable
-- are only claimed (handed = false): the worker passes them to pgcast_handoff_v2, whose
-- rare path skips them under the broadcast row lock. Fences: the pause and unsubscribe
-- advisory locks, shared, as in pgcast_handoff_v2; a cancel meets it on the rows.
-- v3: synchronous commit pinned, the unsubscribe fence, suppressed and erased contacts,
-- the contact's attributes and tags (after name).
CREATE FUNCTION pgcast_claim_handoff_v3(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint)
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
                 coalesce(ct.tags, '{}') AS tags, ct.id IS NOT NULL AND ct.unsubscribed_at IS NULL AND ct.suppressed_at IS NULL
                     AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e, k.mailable,
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

-- cancelled broadcasts whose counters say rows are still in flight: what a sweep visits
-- besides the active ones (a cancel turns pending and claimed rows into cancelled, so what
-- the counters do not account for is sending): tiny, so a sweep reads no finished broadcast.
-- Its predicate reads the counters, so a counter update is no longer a HOT update (one
-- index entry per index of broadcasts per record, i.e. per group of recipients, not per
-- recipient): the price of a sweep that stays O(active broadcasts) over years of history.
CREATE INDEX broadcasts_cancelled_in_flight ON broadcasts (id)
    WHERE status = 'cancelled'
      AND total - sent - failed - skipped - unknown - cancelled > 0;

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

-- 0008_feedback (issue 14): SES feedback, the reputation guard, unsuppress.
CREATE TABLE sns_messages (
    message_id  text        PRIMARY KEY,
    topic_arn   text        NOT NULL,
    type        text        NOT NULL,
    -- the SNS Timestamp: SNS retries keep it, so it says when a row may be forgotten
    sent_at     timestamptz NOT NULL,
    received_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX sns_messages_sent ON sns_messages (sent_at);

ALTER TABLE contacts ADD COLUMN last_delivery_at timestamptz;
CREATE INDEX contacts_email ON contacts (lower(email));
CREATE INDEX contacts_suppressed_id ON contacts (account, id) WHERE suppressed_at IS NOT NULL;

ALTER TABLE broadcasts
    ADD COLUMN guard_sent       integer NOT NULL DEFAULT 0,
    ADD COLUMN guard_bounced    integer NOT NULL DEFAULT 0,
    ADD COLUMN guard_complained integer NOT NULL DEFAULT 0;

-- A broadcast that starts sending (send, resume, a retry) re-arms the guard from its counts
-- at that moment: whatever function makes the transition, the baseline follows.
CREATE FUNCTION pgcast_guard_rearm_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.guard_sent := NEW.sent;
    NEW.guard_bounced := NEW.bounced;
    NEW.guard_complained := NEW.complained;
    RETURN NEW;
END
$$;
CREATE TRIGGER broadcasts_guard_rearm BEFORE UPDATE OF status ON broadcasts
    FOR EACH ROW WHEN (NEW.status = 'sending' AND OLD.status <> 'sending')
    EXECUTE FUNCTION pgcast_guard_rearm_v1();

-- The reason the guard pauses a sending broadcast for, or NULL: after at least p_min rows
-- sent since the baseline, hard bounces (or complaints) / rows sent above the limit.
CREATE FUNCTION pgcast_guard_reason_v1(b broadcasts, p_min integer,
                                       p_max_bounce double precision,
                                       p_max_complaint double precision)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN b.status <> 'sending' OR b.sent - b.guard_sent < greatest(p_min, 1) THEN NULL
        WHEN b.complained - b.guard_complained > p_max_complaint * (b.sent - b.guard_sent)
            THEN 'complaint_rate'
        WHEN b.bounced - b.guard_bounced > p_max_bounce * (b.sent - b.guard_sent)
            THEN 'bounce_rate'
    END
$$;

-- One contact's feedback, the contact row locked by the caller. A stronger outcome is
-- never weakened: complaint > bounce > soft_bounce, and a delivery lifts nothing. Returns
-- what changed ('suppress', 'soft_bounce', 'reset', 'delivery') or NULL. Appends every
-- suppression, unsubscribe and counted soft bounce to contact_events (source 'ses').
CREATE FUNCTION pgcast_contact_feedback_v1(p_contact bigint, p_event text, p_detail text,
                                           p_at timestamptz, p_soft_limit integer,
                                           p_broadcast uuid, p_message_id text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    c contacts;
    rank_old integer;
    n integer;
    reason text;
    details jsonb;
    actor jsonb := jsonb_build_object('via', 'ses', 'sns_message_id', p_message_id);
BEGIN
    SELECT * INTO c FROM contacts WHERE id = p_contact;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    details := jsonb_build_object('event', p_event, 'at', p_at, 'detail', p_detail);
    IF p_event = 'delivery' THEN
        IF c.last_delivery_at IS NOT NULL AND p_at <= c.last_delivery_at THEN
            RETURN 'delivery';  -- a newer delivery is already known
        END IF;
        -- the run of soft bounces is what happened after the newest delivery: the counted
        -- ones are in contact_events with their time (logged no earlier than they happened,
        -- give or take the clocks: the hour), so a late delivery keeps those after it
        SELECT count(*) INTO n FROM contact_events e
        WHERE c.soft_bounces > 0 AND e.account = c.account AND e.contact_id = c.id
          AND e.at >= p_at - interval '1 hour' AND e.action = 'soft_bounce'
          AND (e.details->>'at')::timestamptz > p_at;
        UPDATE contacts SET last_delivery_at = p_at, soft_bounces = least(n, soft_bounces)
        WHERE id = p_contact;
        RETURN CASE WHEN n < c.soft_bounces THEN 'reset' ELSE 'delivery' END;
    END IF;
    rank_old := CASE c.suppressed_reason WHEN 'soft_bounce' THEN 1 WHEN 'bounce' THEN 2
                                         WHEN 'complaint' THEN 3 ELSE 0 END;
    IF p_event = 'soft_bounce' THEN
        IF c.suppressed_at IS NOT NULL
           OR (c.last_delivery_at IS NOT NULL AND p_at <= c.last_delivery_at) THEN
            RETURN NULL;  -- already suppressed, or a delivery happened after it
        END IF;
        UPDATE contacts SET soft_bounces = soft_bounces + 1, updated_at = now()
        WHERE id = p_contact;
        INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id,
                                    details)
        VALUES (c.account, c.id, 'soft_bounce', 'ses', actor, p_broadcast,
                details || jsonb_build_object('soft_bounces', c.soft_bounces + 1));
        IF c.soft_bounces + 1 < p_soft_limit THEN
            RETURN 'soft_bounce';
        END IF;
        reason := 'soft_bounce';
    ELSIF p_event = 'bounce' AND rank_old < 2 THEN
        reason := 'bounce';
    ELSIF p_event = 'complaint' THEN
        IF c.unsubscribed_at IS NULL THEN
            UPDATE contacts SET unsubscribed_at = clock_timestamp(), updated_at = now()
            WHERE id = p_contact;
            INSERT INTO contact_events (account, contact_id, action, source, actor,
                                        broadcast_id, details)
            VALUES (c.account, c.id, 'unsubscribe', 'ses', actor, p_broadcast, details);
        END IF;
        IF rank_old < 3 THEN
            reason := 'complaint';
        END IF;
    END IF;
    IF reason IS NULL THEN
        RETURN NULL;
    END IF;
    UPDATE contacts
    SET suppressed_at = coalesce(suppressed_at, clock_timestamp()), suppressed_reason = reason,
        suppressed_detail = left(p_detail, 1000), updated_at = now()
    WHERE id = p_contact;
    INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id,
                                details)
    VALUES (c.account, c.id, 'suppress', 'ses', actor, p_broadcast,
            details || jsonb_build_object('reason', reason, 'was', c.suppressed_reason));
    RETURN 'suppress';
END
$$;

-- Applies one SES event, once per SNS MessageId. p_event: 'bounce' (permanent),
-- 'soft_bounce' (transient or undetermined), 'complaint', 'delivery'; anything else is only
-- recorded as seen. Tagged (p_broadcast, p_contact from the message's EmailTags): the
-- recipient row is found by primary key in its broadcast's partition; lock order: the
-- contact row first (no handoff locks one), then the account's contacts fence (0005's
-- trigger, when a suppression or unsubscribe changes), then the broadcast row, then the
-- recipient row: 0005's order (advisory locks, broadcast, recipients) with the contact
-- row before it.
-- Untagged: a hard bounce suppresses the addresses in every account; a complaint, a soft
-- bounce or a delivery changes nothing (outcome 'logged': one sender's business).
-- n_contacts: contacts the event concerned. guard: the reason the broadcast should pause for now (pgcast_guard_v1 does it, in its
-- own transaction, under the handoff lock). O(1) statements, each by key.
CREATE FUNCTION pgcast_ses_event_v1(p_message_id text, p_topic text, p_sns_at timestamptz,
                                    p_prune_before timestamptz, p_event text, p_broadcast uuid,
                                    p_contact bigint, p_addresses text[], p_detail text,
                                    p_at timestamptz, p_soft_limit integer, p_guard_min integer,
                                    p_max_bounce double precision,
                                    p_max_complaint double precision)
RETURNS TABLE (outcome text, broadcast_id uuid, n_contacts integer, guard text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    tagged boolean := false;
    n integer := 0;
    cid bigint;
    b broadcasts;
BEGIN
    INSERT INTO sns_messages (message_id, topic_arn, type, sent_at)
    VALUES (p_message_id, p_topic, 'Notification', p_sns_at)
    ON CONFLICT ON CONSTRAINT sns_messages_pkey DO NOTHING;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'duplicate'::text, NULL::uuid, 0, NULL::text;
        RETURN;
    END IF;
    -- a few expired ids per call: bounded work, and the table stays as small as the window
    DELETE FROM sns_messages s WHERE s.message_id = ANY (ARRAY(
        SELECT o.message_id FROM sns_messages o WHERE o.sent_at < p_prune_before
        ORDER BY o.sent_at LIMIT 20 FOR UPDATE SKIP LOCKED));
    IF p_event NOT IN ('bounce', 'soft_bounce', 'complaint', 'delivery') THEN
        RETURN QUERY SELECT 'ignored'::text, NULL::uuid, 0, NULL::text;
        RETURN;
    END IF;
    IF p_broadcast IS NOT NULL AND p_contact IS NOT NULL THEN
        SELECT x.account INTO acct FROM broadcasts x WHERE x.id = p_broadcast;
        -- the tags must name a row of that broadcast whose contact is in its account
        tagged := FOUND AND EXISTS (
            SELECT 1 FROM broadcast_recipients r JOIN contacts k ON k.id = r.contact_id
            WHERE r.broadcast_id = p_broadcast AND r.contact_id = p_contact
              AND k.account = acct);
    END IF;
    IF NOT tagged THEN
        IF p_event <> 'bounce' THEN
            RETURN QUERY SELECT 'logged'::text, NULL::uuid, 0, NULL::text;
            RETURN;
        END IF;
        -- the address does not exist: suppressed in every account that has it. Every row
        -- is locked first, then the accounts' contact fences (0005's trigger) are taken in
        -- the order of their keys: two such calls never wait for each other in a circle
        FOREACH cid IN ARRAY ARRAY(
            SELECT k.id FROM contacts k
            WHERE lower(k.email) = ANY (ARRAY(SELECT lower(a) FROM unnest(p_addresses) a))
            ORDER BY hashtext(k.account), k.id FOR NO KEY UPDATE) LOOP
            PERFORM pgcast_contact_feedback_v1(cid, p_event, p_detail, p_at, p_soft_limit,
                                               NULL, p_message_id);
            n := n + 1;
        END LOOP;
        RETURN QUERY SELECT CASE WHEN n > 0 THEN 'applied' ELSE 'unmatched' END, NULL::uuid,
                            n, NULL::text;
        RETURN;
    END IF;
    -- 1. the contact
    PERFORM 1 FROM contacts k WHERE k.id = p_contact FOR NO KEY UPDATE;
    PERFORM pgcast_contact_feedback_v1(p_contact, p_event, p_detail, p_at, p_soft_limit,
                                       p_broadcast, p_message_id);
    IF p_event = 'soft_bounce' THEN
        RETURN QUERY SELECT 'applied'::text, p_broadcast, 1, NULL::text;
        RETURN;
    END IF;
    -- 2. the broadcast row, 3. the recipient row; counters in the same transaction
    PERFORM 1 FROM broadcasts x WHERE x.id = p_broadcast FOR NO KEY UPDATE;
    UPDATE broadcast_recipients r
    SET delivered_at = CASE WHEN p_event = 'delivery' THEN p_at ELSE r.delivered_at END,
        bounced_at = CASE WHEN p_event = 'bounce' THEN p_at ELSE r.bounced_at END,
        complained_at = CASE WHEN p_event = 'complaint' THEN p_at ELSE r.complained_at END
    WHERE r.broadcast_id = p_broadcast AND r.contact_id = p_contact
      AND CASE p_event WHEN 'delivery' THEN r.delivered_at IS NULL
                       WHEN 'bounce' THEN r.bounced_at IS NULL
                       ELSE r.complained_at IS NULL END;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE broadcasts x
    SET delivered = x.delivered + CASE WHEN p_event = 'delivery' THEN n ELSE 0 END,
        bounced = x.bounced + CASE WHEN p_event = 'bounce' THEN n ELSE 0 END,
        complained = x.complained + CASE WHEN p_event = 'complaint' THEN n ELSE 0 END
    WHERE x.id = p_broadcast AND n > 0
    RETURNING x.* INTO b;
    RETURN QUERY SELECT 'applied'::text, p_broadcast, 1,
                        CASE WHEN n > 0 THEN pgcast_guard_reason_v1(b, p_guard_min, p_max_bounce,
                                                                    p_max_complaint) END;
END
$$;

-- The reputation guard: pauses a sending broadcast (pgcast_pause_v4, reason bounce_rate or
-- complaint_rate, the figures in the audit log) when its rates are past the limits, checked
-- again under the handoff lock and the broadcast row lock (the order pgcast_pause_v3 takes
-- them). Returns the reason, or NULL when the broadcast is fine or no longer sending.
CREATE FUNCTION pgcast_guard_v1(p_id uuid, p_min integer, p_max_bounce double precision,
                                p_max_complaint double precision)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts;
    reason text;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT * INTO b FROM broadcasts x WHERE x.id = p_id FOR NO KEY UPDATE;
    reason := pgcast_guard_reason_v1(b, p_min, p_max_bounce, p_max_complaint);
    IF reason IS NULL THEN
        RETURN NULL;
    END IF;
    PERFORM pgcast_pause_v4(NULL, p_id, reason, jsonb_build_object(
        'by', 'guard', 'sent', b.sent - b.guard_sent, 'bounced', b.bounced - b.guard_bounced,
        'complained', b.complained - b.guard_complained,
        'max_bounce_rate', p_max_bounce, 'max_complaint_rate', p_max_complaint));
    RETURN reason;
END
$$;

-- Lifts one contact's suppression (audited in contact_events). ok = false: the contact was
-- not suppressed. No row: no such contact in the account. A complaint's unsubscribe stays.
CREATE FUNCTION pgcast_unsuppress_v1(p_account text, p_email text, p_source text,
                                     p_actor jsonb)
RETURNS TABLE (ok boolean, email text, was text)
LANGUAGE plpgsql AS $$
DECLARE
    c contacts;
BEGIN
    SELECT * INTO c FROM contacts k
    WHERE k.account = p_account AND lower(k.email) = lower(p_email) FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF c.suppressed_at IS NULL THEN
        RETURN QUERY SELECT false, c.email, NULL::text;
        RETURN;
    END IF;
    UPDATE contacts
    SET suppressed_at = NULL, suppressed_reason = NULL, suppressed_detail = NULL,
        soft_bounces = 0, updated_at = now()
    WHERE id = c.id;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (c.account, c.id, 'unsuppress', p_source, coalesce(p_actor, '{}'::jsonb),
            jsonb_build_object('reason', c.suppressed_reason, 'detail', c.suppressed_detail,
                               'suppressed_at', c.suppressed_at));
    RETURN QUERY SELECT true, c.email, c.suppressed_reason;
END
$$;

-- 0007_schedule_retry: scheduled sends and the retry of failed recipients.
-- why a broadcast ended failed without sending (missed_window, empty_segment); NULL otherwise
ALTER TABLE broadcasts ADD COLUMN failed_reason text;

-- schedule: draft -> scheduled at p_at, with an optional latest start p_not_after. The edges
-- check the times (an offset given, not in the past, not_after >= at); the table's CHECKs
-- hold what the functions need. Another status: (false, status, its times), nothing changed.
CREATE FUNCTION pgcast_schedule_v1(p_account text, p_id uuid, p_at timestamptz,
                                   p_not_after timestamptz, p_details jsonb)
RETURNS TABLE (ok boolean, status text, scheduled_at timestamptz, not_after timestamptz)
LANGUAGE plpgsql AS $$
BEGIN
    -- an acknowledged schedule is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'scheduled', scheduled_at = p_at, not_after = p_not_after, updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('schedule', u.status, 'scheduled',
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('scheduled_at', p_at, 'not_after', p_not_after))
    WHERE u.id = p_id AND u.account = p_account AND u.status = ANY (ARRAY['draft'])
    RETURNING true, u.status, u.scheduled_at, u.not_after;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status, b.scheduled_at, b.not_after FROM broadcasts b
            WHERE b.id = p_id AND b.account = p_account;
    END IF;
END
$$;

-- unschedule: scheduled -> draft; the times are cleared (the audit entry keeps them).
CREATE FUNCTION pgcast_unschedule_v1(p_account text, p_id uuid, p_details jsonb)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'draft', scheduled_at = NULL, not_after = NULL, updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('unschedule', u.status, 'draft',
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('scheduled_at', u.scheduled_at, 'not_after', u.not_after))
    WHERE u.id = p_id AND u.account = p_account AND u.status = ANY (ARRAY['scheduled'])
    RETURNING true, u.status;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status FROM broadcasts b
            WHERE b.id = p_id AND b.account = p_account;
    END IF;
END
$$;

-- retry: a finished (sent or failed) broadcast's failed rows, and its unknown rows when
-- p_include_unknown (the provider may have delivered those: only when asked), back to
-- pending with attempts reset, and the broadcast back to sending under a new epoch (work
-- claimed before can never be handed off). The rows keep their worker, so claims find them
-- through the requeued index, and they pass the same handoff fence as the first time: a
-- contact unsubscribed or suppressed since is skipped there. Sent and skipped rows are
-- never touched. Lock order: the broadcast row, then the rows in contact_id order (one
-- InitPlan), updated by key; the counters move in the same transaction as the rows.
-- Not finished, or nothing to retry: (false, status, 0), nothing changed.
CREATE FUNCTION pgcast_retry_v1(p_account text, p_id uuid, p_include_unknown boolean,
                                p_details jsonb)
RETURNS TABLE (ok boolean, status text, requeued integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    st text;
    ids bigint[];
    n_unknown integer;
    e integer;
BEGIN
    -- an acknowledged retry is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_id AND b.account = p_account
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF st NOT IN ('sent', 'failed') THEN
        RETURN QUERY SELECT false, st, 0;
        RETURN;
    END IF;
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL
          AND l.status IN ('failed', 'unknown')
          AND (l.status = 'failed' OR p_include_unknown)
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(ids) = 0 THEN
        RETURN QUERY SELECT false, st, 0;
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE r.status = 'unknown') INTO n_unknown
    FROM broadcast_recipients r WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcast_recipients r
    SET status = 'pending', attempts = 0, retry_at = NULL, claim_token = NULL,
        claim_epoch = NULL, lease_expires_at = NULL, handed_at = NULL,
        provider_message_id = NULL, last_error = NULL, sent_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcasts AS u
    SET status = 'sending', epoch = u.epoch + 1,
        failed = u.failed - (cardinality(ids) - n_unknown), unknown = u.unknown - n_unknown,
        failure_streak = 0, paused_reason = NULL, failed_reason = NULL, finished_at = NULL,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('retry', u.status, 'sending',
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('requeued', cardinality(ids),
                                  'failed', cardinality(ids) - n_unknown,
                                  'unknown', n_unknown, 'include_unknown', p_include_unknown))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sent', 'failed'])
    RETURNING u.epoch INTO e;
    PERFORM pgcast_notify_v1('retry', p_id, e);
    RETURN QUERY SELECT true, 'sending'::text, cardinality(ids);
END
$$;

-- 0009_erasure: the right to erasure (`pgcast contacts erase`, POST /contacts/erase).
-- contact_erasures keeps a SHA-256 of each erased address so that a re-import is refused;
-- an erased contact is deleted, its recipient rows keep a placeholder address.
CREATE TABLE contact_erasures (
    account    text        NOT NULL,
    email_hash bytea       NOT NULL,
    erased_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, email_hash)
);



-- 0010_retention
ALTER TABLE broadcasts ADD COLUMN archived_at timestamptz;

-- What a DBA asks of an old broadcast: was this address sent, when, with which provider
-- message id, and if not, why. Fixed-width columns first (no alignment padding), rows
-- appended in contact order and never updated (fillfactor 100). One index: the question
-- is asked by address.
CREATE TABLE broadcast_recipients_archive (
    broadcast_id        uuid        NOT NULL,
    contact_id          bigint      NOT NULL,
    sent_at             timestamptz,
    delivered_at        timestamptz,
    bounced_at          timestamptz,
    complained_at       timestamptz,
    status              text        NOT NULL,
    email               text        NOT NULL,
    provider_message_id text,
    last_error          text
) WITH (fillfactor = 100);
-- unique: a snapshot has one row per contact, and an account one contact per address
CREATE UNIQUE INDEX broadcast_recipients_archive_email
    ON broadcast_recipients_archive (broadcast_id, lower(email));

-- Every recipient, live or archived, for reading by hand (`archived` says which). To look
-- one address up quickly use the query `recipient_lookup` (sql/ops.sql): a live partition
-- is keyed by contact, not by address.
CREATE VIEW broadcast_recipients_all AS
SELECT r.broadcast_id, r.contact_id, r.email, r.status, r.sent_at, r.provider_message_id,
       r.last_error, r.delivered_at, r.bounced_at, r.complained_at, false AS archived
FROM broadcast_recipients r
UNION ALL
SELECT a.broadcast_id, a.contact_id, a.email, a.status, a.sent_at, a.provider_message_id,
       a.last_error, a.delivered_at, a.bounced_at, a.complained_at, true AS archived
FROM broadcast_recipients_archive a;

-- archive one broadcast whose partition the caller has detached: copy its rows, mark the
-- broadcast archived (audit: 'archive'), drop the partition, in one transaction. A broadcast
-- that is no longer finished (sent back to sending since the caller looked) gets its
-- partition attached again instead. Returns the rows archived; NULL when nothing was done.
CREATE FUNCTION pgcast_archive_v1(p_id uuid)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part regclass := to_regclass(pgcast_partition_name_v1(p_id));
    st text;
    n integer;
BEGIN
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.archived_at IS NULL FOR UPDATE;
    IF NOT FOUND OR part IS NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = part) THEN
        RAISE EXCEPTION 'partition % of broadcast % is still attached', part, p_id;
    END IF;
    IF st NOT IN ('sent', 'failed', 'cancelled') THEN
        EXECUTE format('ALTER TABLE broadcast_recipients ATTACH PARTITION %s FOR VALUES IN (%L)',
                       part, p_id);
        RETURN NULL;
    END IF;
    EXECUTE format(
        'INSERT INTO broadcast_recipients_archive (broadcast_id, contact_id, sent_at,'
        '  delivered_at, bounced_at, complained_at, status, email, provider_message_id,'
        '  last_error)'
        ' SELECT broadcast_id, contact_id, sent_at, delivered_at, bounced_at, complained_at,'
        '  status, email, provider_message_id, last_error FROM %s ORDER BY contact_id', part);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE broadcasts b
    SET archived_at = now(), updated_at = now(),
        audit_log = b.audit_log || pgcast_audit_v1('archive', b.status, b.status,
                                                   jsonb_build_object('recipients', n))
    WHERE b.id = p_id;
    EXECUTE format('DROP TABLE %s', part);
    RETURN n;
END
$$;

-- 0011: one limit shared fairly. When a shared bucket (the global one) is the constraint,
-- its tokens are shared in two levels: across accounts, by an operator-set weight
-- (rate_weights, default 1), then across an account's broadcasts, by their priority (1-10).
--
-- Start-time fair queueing over the token bucket. Every account and every broadcast that
-- takes from a shared bucket has a virtual time: the tokens it was granted over its weight.
-- A taker that asked for more than it got lately is *waiting* (the bucket is its
-- constraint). A taker may run at most half a burst of tokens ahead of the most-behind
-- waiting peer (an account among the accounts, a broadcast among its account's broadcasts);
-- beyond that it gets only what the bucket would otherwise soon lose: once the bucket is
-- within a token of full, the tokens above half of it. So the total stays at the limit (work-conserving: what a taker
-- does not use goes to the others), and the bucket's own guarantees hold (every grant comes
-- out of the one bucket, under its lock). A taker that starts, or comes back after needing
-- less, begins at the level's virtual clock (the start time of the latest grant): no credit
-- is banked while idle. A grant costs one scan of the level's recent takers: O(active
-- accounts + the account's active broadcasts).

-- An account's weight in a shared bucket, set by the operator (`pgcast rate weight`), never
-- through the tenant API. No row: weight 1.
CREATE TABLE rate_weights (
    account    text        PRIMARY KEY,
    weight     integer     NOT NULL CHECK (weight BETWEEN 1 AND 1000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- the account level's virtual clock, per bucket
ALTER TABLE rate_limits ADD COLUMN vclock double precision NOT NULL DEFAULT 0;

-- Takers of a shared bucket: soft state, rewritten by every grant. A row not asked for in a
-- minute is pruned by the sweeper (its taker starts again at the clock, as after any pause).
CREATE TABLE rate_account_shares (
    bucket     text             NOT NULL,
    account    text             NOT NULL,
    vtime      double precision NOT NULL,  -- tokens granted / account weight
    vclock     double precision NOT NULL,  -- the broadcast level's clock in this account
    asked_at   timestamptz      NOT NULL,
    waiting_at timestamptz,                -- last ask that got less than it wanted
    PRIMARY KEY (bucket, account)
);
CREATE TABLE rate_broadcast_shares (
    bucket       text             NOT NULL,
    broadcast_id uuid             NOT NULL,
    account      text             NOT NULL,
    vtime        double precision NOT NULL,  -- tokens granted / priority
    asked_at     timestamptz      NOT NULL,
    waiting_at   timestamptz,
    PRIMARY KEY (bucket, broadcast_id)
);
CREATE INDEX rate_broadcast_shares_account ON rate_broadcast_shares (bucket, account);

-- How long after its last unsatisfied ask a taker still counts as waiting, in seconds: twice
-- the longest a waiting taker sleeps before it asks again (a burst's worth of refill), and
-- 50 ms for the round trip; at least 100 ms, at most 1.5 s (workers sleep at most 1 s).
CREATE FUNCTION pgcast_waiting_horizon_v1(p_rate double precision, p_burst double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_rate > 0 THEN greatest(0.1, least(1.5, 0.05 + 2 * p_burst / p_rate))
                ELSE 0.1 END
$$;

-- take, v2: v1 plus the fair share of a broadcast's account and of the broadcast within it
-- (p_broadcast NULL, or a broadcast that does not exist: v1's first come, first served).
-- `ahead`: nothing was granted because the taker is ahead of a waiting peer (wait_seconds is
-- then when the bucket will be nearly full), not because the bucket is empty.
CREATE FUNCTION pgcast_take_tokens_v2(p_name text, p_want integer, p_broadcast uuid)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    recent timestamptz;
    have double precision;
    g integer;
    acct text;
    prio double precision;
    w double precision;
    quantum double precision;
    fair double precision := 'Infinity';
    a_row rate_account_shares%ROWTYPE;
    b_row rate_broadcast_shares%ROWTYPE;
    a_new boolean;
    b_new boolean;
    a_min double precision;
    b_min double precision;
    a_start double precision;
    b_start double precision;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision, false;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    SELECT br.account, br.priority INTO acct, prio FROM broadcasts br WHERE br.id = p_broadcast;
    IF acct IS NULL THEN
        -- floor before the cast: a burst beyond an integer's range must not fail the take
        g := floor(greatest(0, least(p_want::double precision, have)))::integer;
        UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
        RETURN QUERY SELECT g, CASE WHEN g > 0 THEN 0.0 ELSE (1 - (have - g)) / b.rate END, false;
        RETURN;
    END IF;
    w := coalesce((SELECT rw.weight FROM rate_weights rw WHERE rw.account = acct), 1);
    recent := t - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst));
    quantum := greatest(1, b.burst / 2);

    -- the most-behind waiting peers
    SELECT min(s.vtime) INTO a_min FROM rate_account_shares s
    WHERE s.bucket = p_name AND s.account <> acct AND s.waiting_at > recent;
    SELECT min(s.vtime) INTO b_min FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.account = acct AND s.broadcast_id <> p_broadcast
      AND s.waiting_at > recent;

    -- this taker's rows; one that was not waiting starts at the clock (no banked credit)
    SELECT * INTO a_row FROM rate_account_shares s WHERE s.bucket = p_name AND s.account = acct;
    a_new := NOT FOUND;
    IF a_new THEN
        a_row.bucket := p_name;
        a_row.account := acct;
        a_row.vtime := b.vclock;
        a_row.vclock := 0;
    ELSIF a_row.waiting_at IS NULL OR a_row.waiting_at <= recent THEN
        a_row.vtime := greatest(a_row.vtime, b.vclock);
    END IF;
    SELECT * INTO b_row FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    b_new := NOT FOUND;
    IF b_new THEN
        b_row.bucket := p_name;
        b_row.broadcast_id := p_broadcast;
        b_row.account := acct;
        b_row.vtime := a_row.vclock;
    ELSIF b_row.waiting_at IS NULL OR b_row.waiting_at <= recent THEN
        b_row.vtime := greatest(b_row.vtime, a_row.vclock);
    END IF;

    -- tokens this taker may have before it runs a quantum ahead of a waiting peer
    IF a_min IS NOT NULL THEN
        fair := least(fair, quantum - (a_row.vtime - a_min) * w);
    END IF;
    IF b_min IS NOT NULL THEN
        fair := least(fair, quantum - (b_row.vtime - b_min) * prio);
    END IF;
    IF fair >= 1 THEN
        g := floor(greatest(0, least(p_want::double precision, have, fair)))::integer;
    ELSIF have >= b.burst - 1 THEN
        -- ahead, but the bucket is about to be full: what it would otherwise lose, the tokens
        -- above half of it (at least one, so a bucket of one or two loses nothing either)
        g := floor(greatest(0, least(p_want::double precision, have,
                                     greatest(have - b.burst / 2, 1))))::integer;
    ELSE
        g := 0;
    END IF;

    a_start := a_row.vtime;
    b_start := b_row.vtime;
    a_row.vtime := a_row.vtime + g / w;
    b_row.vtime := b_row.vtime + g / prio;
    a_row.asked_at := t;
    b_row.asked_at := t;
    IF g < p_want THEN
        a_row.waiting_at := t;
        b_row.waiting_at := t;
    END IF;
    IF g > 0 THEN
        a_row.vclock := greatest(a_row.vclock, b_start);
    END IF;
    IF a_new THEN
        INSERT INTO rate_account_shares (bucket, account, vtime, vclock, asked_at, waiting_at)
        VALUES (p_name, acct, a_row.vtime, a_row.vclock, t, a_row.waiting_at);
    ELSE
        UPDATE rate_account_shares s
        SET vtime = a_row.vtime, vclock = a_row.vclock, asked_at = t, waiting_at = a_row.waiting_at
        WHERE s.bucket = p_name AND s.account = acct;
    END IF;
    IF b_new THEN
        INSERT INTO rate_broadcast_shares (bucket, broadcast_id, account, vtime, asked_at,
                                           waiting_at)
        VALUES (p_name, p_broadcast, acct, b_row.vtime, t, b_row.waiting_at);
    ELSE
        UPDATE rate_broadcast_shares s
        SET vtime = b_row.vtime, asked_at = t, waiting_at = b_row.waiting_at
        WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    END IF;
    UPDATE rate_limits
    SET tokens = have - g, refilled_at = t,
        vclock = CASE WHEN g > 0 THEN greatest(vclock, a_start) ELSE vclock END
    WHERE name = p_name;
    RETURN QUERY SELECT g, CASE
        WHEN g > 0 THEN 0.0
        WHEN have < 1 THEN (1 - have) / b.rate
        -- ahead of a waiting peer: it is served first; look again when the bucket is full
        ELSE greatest(1 - (have - floor(have)), b.burst - 1 - have) / b.rate END,
        g = 0 AND have >= 1;
END
$$;

-- give back: tokens a taker took from a bucket of its own (a broadcast's cap) and could not
-- use, because the global bucket or the in-flight window granted fewer. Under the bucket's
-- lock, never above its burst.
CREATE FUNCTION pgcast_give_back_tokens_v1(p_name text, p_tokens integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    IF p_tokens <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    t := clock_timestamp();
    UPDATE rate_limits
    SET tokens = least(burst, tokens + greatest(0, extract(epoch FROM t - refilled_at)) * rate
                              + p_tokens),
        refilled_at = t
    WHERE name = p_name AND rate > 0;
END
$$;

-- prune: forget takers not heard from in a minute (they start again at the clock, as after
-- any pause), each bucket under its own lock, buckets in name order: a take holds that lock
-- while it updates its rows, so the two never wait for each other's rows.
CREATE FUNCTION pgcast_rate_prune_v1() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    bk text;
    n integer := 0;
    k integer;
BEGIN
    FOR bk IN SELECT bucket FROM rate_account_shares UNION SELECT bucket FROM rate_broadcast_shares
              ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(bk));
        DELETE FROM rate_broadcast_shares
        WHERE bucket = bk AND asked_at < clock_timestamp() - interval '1 minute';
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
        DELETE FROM rate_account_shares
        WHERE bucket = bk AND asked_at < clock_timestamp() - interval '1 minute';
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;

-- The shares of the takers of the last two seconds (a waiting worker asks again within one): an account's part of the bucket's rate is its
-- weight over the weights of the accounts taking, a broadcast's part of that is its priority
-- over its account's broadcasts' priorities, capped by its own rate limit. A taker that uses
-- less leaves the rest to the others (the figure is its entitlement, not what it sends).
-- `waiting`: it asked for more than it got lately (the bucket is its constraint).
CREATE VIEW rate_shares_active AS
WITH takers AS (
    SELECT s.bucket, s.account, coalesce(rw.weight, 1) AS account_weight, s.broadcast_id,
           br.priority, br.rate_limit,
           s.waiting_at > clock_timestamp() - make_interval(
               secs => pgcast_waiting_horizon_v1(l.rate, l.burst)) IS TRUE AS waiting
    FROM rate_broadcast_shares s
    JOIN rate_limits l ON l.name = s.bucket
    JOIN broadcasts br ON br.id = s.broadcast_id AND br.status = 'sending'
    LEFT JOIN rate_weights rw ON rw.account = s.account
    WHERE s.asked_at > clock_timestamp() - interval '2 seconds'
), accounts AS (
    SELECT bucket, account, max(account_weight) AS account_weight, sum(priority) AS priorities
    FROM takers GROUP BY bucket, account
), buckets AS (
    SELECT bucket, sum(account_weight) AS weights FROM accounts GROUP BY bucket
)
SELECT t.bucket, t.account, t.account_weight, t.broadcast_id, t.priority,
       least(t.rate_limit,
             l.rate * t.account_weight / bk.weights * t.priority / a.priorities)
           AS share_per_second,
       t.waiting
FROM takers t
JOIN accounts a ON a.bucket = t.bucket AND a.account = t.account
JOIN buckets bk ON bk.bucket = t.bucket
JOIN rate_limits l ON l.name = t.bucket AND l.rate > 0;

-- progress, v3: 0004's columns and the broadcast's current share of the global rate
-- (NULL: it is not taking tokens now, or there is no global limit)
CREATE OR REPLACE VIEW broadcast_progress AS
SELECT b.id AS broadcast_id,
       b.account,
       b.status,
       b.total,
       b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled AS pending,
       b.sent,
       b.failed,
       b.skipped,
       b.unknown,
       b.cancelled,
       b.epoch,
       b.paused_reason,
       b.created_at,
       b.started_at,
       b.finished_at,
       b.scheduled_at,
       b.delivered,
       b.bounced,
       b.complained,
       s.share_per_second
FROM broadcasts b
LEFT JOIN rate_shares_active s ON s.broadcast_id = b.id AND s.bucket = 'global';

-- 0012_erasure_races (issue 24): an erasure holds whatever runs at the same time.
-- * The erasure lock, the advisory lock (pgcast.erasure, account): exclusive in the erase,
--   shared by every writer that could bring an address back (an import or POST /contacts,
--   pgcast_contacts_upsert_v1; a send's snapshot, pgcast_send_v5) while it checks the
--   erased hashes and writes. Each takes it before anything else and reads in statements
--   that begin after it, so either the erase sees what the writer committed, or the writer
--   sees the erase's hash (0011's upsert checked the hash in a snapshot taken before it
--   waited on the contact the erase was deleting, and inserted the address again).
-- * An import locks the existing contacts it will update, in id order, before any fence
--   trigger fires (pgcast_contacts_lock_v1): 0011's ON CONFLICT locked row N+1 after the
--   trigger of row N had taken the contacts fence, and deadlocked with a one-click
--   unsubscribe or an SES complaint of row N+1.
-- * The erase (pgcast_erase_v3) also reaches a partition that retention has detached but
--   not yet archived (it waits for an archive in progress on the broadcast row), the SES
--   diagnostics kept in contact_events, and test sends to the address (their rows and the
--   'test' entries of the broadcasts' audit logs).
-- * A recipient row whose address was erased never gets error text back (a trigger: SES
--   error texts quote the address; a record that arrives after the erase wrote it back).
-- * The hash kept of an erased address is keyed (erasure_keys), as docs/design.md says.

-- The key of the erased-address hashes, generated here and never shown: contact_erasures
-- keeps sha256(k2 || sha256(k1 || sha256(lower(address)))), so its rows alone (a dump, a
-- copy of the table) cannot be checked against a list of addresses. 0009's rows were plain
-- SHA-256s; this migration keys them.
CREATE TABLE erasure_keys (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    k1         bytea       NOT NULL
        DEFAULT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
    k2         bytea       NOT NULL
        DEFAULT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO erasure_keys DEFAULT VALUES;

-- Whether an address was erased from an account (its keyed hash is kept): the checks of one
-- address at a time. The import's bulk check spells the hash in its own query, where the
-- planner can join it.
CREATE FUNCTION pgcast_erased_v1(p_account text, p_address text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                   WHERE e.account = p_account
                     AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                         convert_to(lower(btrim(p_address)), 'UTF8')))))
$$;

-- The existing contacts of an import (lower-cased addresses), locked in id order under the
-- erasure lock (shared): the first step of every import, before any row is written, so that
-- no fence trigger fires before the last contact row is held. Returns how many were locked.
CREATE FUNCTION pgcast_contacts_lock_v1(p_account text, p_keys text[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    ids := ARRAY(SELECT c.id FROM contacts c
                 WHERE c.account = p_account AND lower(c.email) = ANY (p_keys)
                 ORDER BY c.id FOR UPDATE);
    RETURN cardinality(ids);
END
$$;

-- upsert contacts from a jsonb array (0011's contacts_upsert statement, as a function): the
-- erasure lock and the existing rows first (pgcast_contacts_lock_v1), then, in a snapshot
-- taken after them, the erased addresses are left out and the rest inserted or updated. An
-- empty name or tags keeps what is stored and attributes merge, unless p_replace; never
-- clears an unsubscribe or a suppression (each one added is appended to contact_events,
-- source 'import'). Returns each written address and whether it is new.
CREATE FUNCTION pgcast_contacts_upsert_v1(p_account text, p_rows jsonb, p_replace boolean)
RETURNS TABLE (email text, inserted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgcast_contacts_lock_v1(p_account, ARRAY(
        SELECT lower(j.email) FROM jsonb_to_recordset(p_rows) AS j(email text)));
    RETURN QUERY
    WITH x AS (
        SELECT x.*
        FROM ROWS FROM (jsonb_to_recordset(p_rows)
                        AS (email text, name text, tags text[], attributes jsonb,
                            unsubscribed_at timestamptz, suppressed_reason text))
             WITH ORDINALITY AS x(email, name, tags, attributes, unsubscribed_at,
                                  suppressed_reason, n)
        WHERE NOT EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                          WHERE e.account = p_account
                            AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                                convert_to(lower(x.email), 'UTF8')))))
    ),
    -- the stored contacts as they were before this statement (every CTE reads one snapshot)
    stored AS (
        SELECT k.id, k.unsubscribed_at, k.suppressed_at FROM contacts k JOIN x
            ON k.account = p_account AND lower(k.email) = lower(x.email)
    ),
    up AS (
        INSERT INTO contacts AS c (account, email, name, tags, attributes, unsubscribed_at,
                                   suppressed_at, suppressed_reason)
        SELECT p_account, x.email, coalesce(x.name, ''), coalesce(x.tags, '{}'),
               coalesce(x.attributes, '{}'), x.unsubscribed_at,
               CASE WHEN x.suppressed_reason IS NOT NULL THEN clock_timestamp() END,
               x.suppressed_reason
        FROM x
        ORDER BY x.n  -- new contacts get their ids in the order given
        ON CONFLICT (account, lower(email)) DO UPDATE
        SET email = EXCLUDED.email,
            name = CASE WHEN p_replace OR EXCLUDED.name <> '' THEN EXCLUDED.name
                        ELSE c.name END,
            tags = CASE WHEN p_replace OR cardinality(EXCLUDED.tags) > 0 THEN EXCLUDED.tags
                        ELSE c.tags END,
            attributes = CASE WHEN p_replace THEN EXCLUDED.attributes
                              ELSE c.attributes || EXCLUDED.attributes END,
            unsubscribed_at = coalesce(c.unsubscribed_at, EXCLUDED.unsubscribed_at),
            suppressed_at = coalesce(c.suppressed_at, EXCLUDED.suppressed_at),
            suppressed_reason = coalesce(c.suppressed_reason, EXCLUDED.suppressed_reason),
            updated_at = now()
        RETURNING c.id, c.email, (c.xmax = 0) AS inserted, c.unsubscribed_at,
                  c.suppressed_at, c.suppressed_reason
    ),
    events AS (
        INSERT INTO contact_events (account, contact_id, action, source, details)
        SELECT p_account, up.id, 'unsubscribe', 'import', '{}'::jsonb
        FROM up LEFT JOIN stored b ON b.id = up.id
        WHERE up.unsubscribed_at IS NOT NULL AND b.unsubscribed_at IS NULL
        UNION ALL
        SELECT p_account, up.id, 'suppress', 'import',
               jsonb_build_object('reason', up.suppressed_reason)
        FROM up LEFT JOIN stored b ON b.id = up.id
        WHERE up.suppressed_at IS NOT NULL AND b.suppressed_at IS NULL
    )
    SELECT up.email, up.inserted FROM up;
END
$$;

-- send: draft|scheduled -> sending, with the snapshot of the mailable contacts of the
-- segment in the broadcast's own partition, in one transaction. Nobody to send to: refused
-- with status 'empty' and nothing changed, unless p_allow_empty (then 'sent' at once).
-- p_details joins the audit entry (who sent it, a schedule's lateness).
-- v5: v4 under the erasure lock (shared), taken first: an erase that committed before has
-- deleted its contact when the snapshot is read; one that comes later waits for the send
-- to commit, then scrubs the new partition like any other (0011: the erase found no row
-- in the uncommitted partition, and the address stayed there in clear).
CREATE FUNCTION pgcast_send_v5(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
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
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
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

-- start: the due scheduled broadcast whose time came first, started through the send
-- function in the caller's one transaction; no row when none is due. The sweeper calls it
-- until it answers nothing, one broadcast per transaction. SKIP LOCKED: concurrent
-- sweepers each take another broadcast (or none), and the send's compare-and-set on the
-- locked row makes every start happen once. The due rows come from the
-- broadcasts_scheduled index, in time order: O(due). A start later than not_after ends the
-- broadcast failed (missed_window); one whose segment has nobody mailable at its start ends
-- failed (empty_segment). The audit entry of the start records scheduled_at, started_at
-- and the lateness.
-- v2: through pgcast_send_v5, and the erasure lock (tried, shared) before the broadcast's
-- row, as every path: the erase can wait for a scheduled broadcast's row (a test entry of its
-- audit log may name the address), so a start that held the row while it waited for the lock
-- deadlocked with it. A due broadcast of an account an erase holds waits for the next sweep.
CREATE FUNCTION pgcast_start_due_v2()
RETURNS TABLE (broadcast_id uuid, status text, queued integer, reason text,
               lateness_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    s record;
    late double precision;
    why text;
    started jsonb;
    c record;
    picked boolean := false;
BEGIN
    -- a start that failed is as durable as one that sent (send_v5 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the erasure lock before the broadcast row, as every path takes them: an erase holds
    -- the lock and may wait for this broadcast's row (its audit log can name the address in
    -- a test entry), so the row is never held while waiting for the lock. A due broadcast
    -- of an account an erase holds is left to the next sweep (never waited for).
    FOR c IN
        SELECT d.id, d.account FROM broadcasts d
        WHERE d.status = 'scheduled' AND d.scheduled_at <= now()
        ORDER BY d.scheduled_at
        LIMIT 10
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock_shared(hashtext('pgcast.erasure'),
                                                            hashtext(c.account));
        SELECT d.id, d.account, d.scheduled_at, d.not_after INTO b
        FROM broadcasts d
        WHERE d.id = c.id AND d.status = 'scheduled' AND d.scheduled_at <= now()
        FOR UPDATE SKIP LOCKED;
        picked := FOUND;
        EXIT WHEN picked;
    END LOOP;
    IF NOT picked THEN
        RETURN;
    END IF;
    late := round(extract(epoch FROM now() - b.scheduled_at), 3);
    started := jsonb_build_object('via', 'schedule', 'scheduled_at', b.scheduled_at,
                                  'not_after', b.not_after, 'started_at', now(),
                                  'lateness_seconds', late);
    IF b.not_after IS NOT NULL AND now() > b.not_after THEN
        why := 'missed_window';
    ELSE
        SELECT * INTO s FROM pgcast_send_v5(b.account, b.id, false, started);
        IF s.ok THEN
            RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
            RETURN;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := 'empty_segment';
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'failed', failed_reason = why, finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('start', u.status, 'failed',
            started || jsonb_build_object('reason', why))
    WHERE u.id = b.id AND u.status = ANY (ARRAY['scheduled'])
    RETURNING u.id, u.status, 0, why, late;
END
$$;

-- erase, v3: remove one address of an account from everything pgcast keeps; keep its hash.
-- Lock order: the erasure lock (exclusive: imports and sends of the account wait, and every
-- statement below reads what they committed), the contact row, the contacts fence, the
-- broadcasts whose audit log names the address in a test send, the contact's recipient
-- rows (one per broadcast), then each broadcast whose partition
-- retention has detached but not archived (FOR KEY SHARE: the archive's FOR UPDATE waits,
-- or is waited for, and its rows are then scrubbed in the archive). Scrubbed: the live
-- recipient rows, those detached partitions, the archive, the SES diagnostics of the
-- contact's events, and test sends to or as the address (rows and audit entries). recipients: rows scrubbed (live,
-- detached and archived). An address that is no contact (any more) is still scrubbed from
-- the archive and the test sends.
CREATE FUNCTION pgcast_erase_v3(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    addr text := lower(btrim(p_email));
    cid bigint;
    gone text;
    n bigint := 0;
    m bigint;
    d record;
    part regclass;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.erasure'), hashtext(p_account));
    INSERT INTO contact_erasures (account, email_hash)
    SELECT p_account, sha256(k.k2 || sha256(k.k1 || sha256(convert_to(addr, 'UTF8'))))
    FROM erasure_keys k
    ON CONFLICT DO NOTHING;
    SELECT c.id INTO cid FROM contacts c
    WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
    IF cid IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(p_account));
    END IF;
    -- test sends to the address, or rendered as its contact: their rows, and the 'test'
    -- entries of the broadcasts' audit logs (broadcast rows before recipient rows)
    -- a test send to the address not yet taken by a worker is withdrawn (never sent to the
    -- placeholder); the worker takes only queued ones
    UPDATE test_sends t
    SET to_address = CASE WHEN lower(t.to_address) = addr THEN 'erased@erased.invalid'
                          ELSE t.to_address END,
        contact_email = CASE WHEN lower(t.contact_email) = addr THEN NULL
                             ELSE t.contact_email END,
        status = CASE WHEN t.status = 'queued' THEN 'failed' ELSE t.status END,
        error = CASE WHEN t.status = 'queued' THEN 'withdrawn: an address was erased' END,
        finished_at = CASE WHEN t.status = 'queued' THEN clock_timestamp()
                           ELSE t.finished_at END
    WHERE t.account = p_account AND (lower(t.to_address) = addr OR lower(t.contact_email) = addr);
    UPDATE broadcasts b
    SET audit_log = (
        SELECT jsonb_agg(CASE WHEN a.e->>'action' = 'test' THEN jsonb_set(jsonb_set(a.e,
                   '{details,to}', coalesce((
                       SELECT jsonb_agg(CASE WHEN lower(t.v #>> '{}') = addr
                                             THEN to_jsonb('erased@erased.invalid'::text)
                                             ELSE t.v END ORDER BY t.i)
                       FROM jsonb_array_elements(a.e->'details'->'to')
                            WITH ORDINALITY AS t(v, i)), '[]'::jsonb)),
                   '{details,contact}',
                   CASE WHEN lower(a.e->'details'->>'contact') = addr THEN 'null'::jsonb
                        ELSE coalesce(a.e->'details'->'contact', 'null'::jsonb) END)
                   ELSE a.e END ORDER BY a.i)
        FROM jsonb_array_elements(b.audit_log) WITH ORDINALITY AS a(e, i))
    WHERE b.account = p_account AND strpos(lower(b.audit_log::text), addr) > 0
      AND b.audit_log @> '[{"action": "test"}]';
    IF cid IS NOT NULL THEN
        gone := 'erased-' || cid || '@erased.invalid';
        UPDATE broadcast_recipients r
        SET email = gone, last_error = NULL
        WHERE r.contact_id = cid
          AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = r.broadcast_id
                      AND b.account = p_account);
        GET DIAGNOSTICS n = ROW_COUNT;
        -- partitions detached by retention (or half-detached) and not archived yet: no
        -- longer part of broadcast_recipients, not in the archive either
        FOR d IN
            SELECT b.id FROM broadcasts b
            WHERE b.account = p_account AND b.archived_at IS NULL
              AND to_regclass(pgcast_partition_name_v1(b.id)) IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM pg_inherits i
                              WHERE i.inhrelid = to_regclass(pgcast_partition_name_v1(b.id))
                                AND NOT i.inhdetachpending)
            ORDER BY b.id
        LOOP
            -- an archive of it in progress holds the row FOR UPDATE: once it commits, the
            -- broadcast is archived and its rows are scrubbed in the archive below
            PERFORM 1 FROM broadcasts b WHERE b.id = d.id AND b.archived_at IS NULL
            FOR KEY SHARE;
            CONTINUE WHEN NOT FOUND;
            part := to_regclass(pgcast_partition_name_v1(d.id));
            CONTINUE WHEN part IS NULL;
            EXECUTE format('UPDATE %s SET email = $1, last_error = NULL WHERE contact_id = $2',
                           part) USING gone, cid;
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END LOOP;
        UPDATE contact_events e SET details = e.details - 'detail'
        WHERE e.account = p_account AND e.contact_id = cid AND e.details ? 'detail';
    END IF;
    -- and the archive, by address (its index), after the waits above
    UPDATE broadcast_recipients_archive a
    SET email = 'erased-' || a.contact_id || '@erased.invalid', last_error = NULL
    WHERE a.broadcast_id IN (SELECT b.id FROM broadcasts b
                             WHERE b.account = p_account AND b.archived_at IS NOT NULL)
      AND lower(a.email) = addr;
    GET DIAGNOSTICS m = ROW_COUNT;
    n := n + m;
    IF cid IS NOT NULL THEN
        DELETE FROM contacts c WHERE c.id = cid;
        INSERT INTO contact_events (account, contact_id, action, source, actor)
        VALUES (p_account, cid, 'erase', p_source, coalesce(p_actor, '{}'::jsonb));
    END IF;
    RETURN QUERY SELECT cid, n;
END
$$;

-- A recipient row whose address was erased keeps no error text: whoever writes one (a
-- record that arrives after the erase, with an SES text quoting the address), a fixed text
-- is stored instead. Fires only for the rare rows the erase rewrote.
CREATE FUNCTION pgcast_erased_error_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_error := 'contact erased: error text not kept';
    RETURN NEW;
END
$$;
CREATE TRIGGER broadcast_recipients_erased_error
    BEFORE UPDATE OF last_error ON broadcast_recipients
    FOR EACH ROW
    WHEN (NEW.last_error IS NOT NULL
          AND NEW.email = 'erased-' || NEW.contact_id || '@erased.invalid'
          AND NEW.last_error NOT IN ('contact erased', 'contact erased: error text not kept'))
    EXECUTE FUNCTION pgcast_erased_error_v1();

-- 0015_senders (issue 23): one limit on account names (1-200 characters), and the From
-- addresses and domains an operator allows an account (`pgcast senders add`).
ALTER TABLE contacts ADD CONSTRAINT contacts_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE contact_erasures ADD CONSTRAINT contact_erasures_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE rate_weights ADD CONSTRAINT rate_weights_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);

-- sender: a lower-case address (has an @) or a lower-case domain, IDNA (punycode) form
CREATE TABLE senders (
    account    text        NOT NULL,
    sender     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, sender),
    CONSTRAINT senders_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT senders_sender_check
        CHECK (sender = lower(sender) AND char_length(sender) BETWEEN 1 AND 254)
);

-- Queue test sends (0001's v1, plus): the erasure lock (shared) first, then the broadcast's
-- row, and inside them the refusals: an address of p_to that is erased (its keyed hash),
-- suppressed or unsubscribed in the account, or a p_contact that is erased, is refused with
-- nothing queued (refused: [{field, address, reason}]). So an erase cannot commit between the
-- check and the queue (the address mailed, or written back into test_sends and the audit log).
CREATE FUNCTION pgcast_test_send_v2(p_account text, p_id uuid, p_to text[], p_contact text,
                                    p_cap integer)
RETURNS TABLE (ok boolean, found boolean, recent integer, ids bigint[], refused jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n integer;
    made bigint[];
    bad jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, 0, '{}'::bigint[], '[]'::jsonb;
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('field', r.field, 'address', r.address,
                                                 'reason', r.reason) ORDER BY r.n), '[]')
    INTO bad
    FROM (
        SELECT a.n, 'to' AS field, a.address,
               CASE WHEN pgcast_erased_v1(p_account, a.address) THEN 'erased'
                    WHEN c.suppressed_at IS NOT NULL
                         THEN 'suppressed (' || c.suppressed_reason || ')'
                    WHEN c.unsubscribed_at IS NOT NULL THEN 'unsubscribed'
               END AS reason
        FROM unnest(p_to) WITH ORDINALITY AS a(address, n)
        LEFT JOIN contacts c ON c.account = p_account AND lower(c.email) = lower(a.address)
        UNION ALL
        SELECT 0, 'contact', p_contact, 'erased'
        WHERE p_contact IS NOT NULL
          AND pgcast_erased_v1(p_account, p_contact)
    ) r
    WHERE r.reason IS NOT NULL;
    IF bad <> '[]'::jsonb THEN
        RETURN QUERY SELECT false, true, 0, '{}'::bigint[], bad;
        RETURN;
    END IF;
    -- one account's requests count one at a time, so two at once cannot both pass the cap
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.test_send'), hashtext(p_account));
    SELECT count(*) INTO n FROM test_sends t
    WHERE t.account = p_account AND t.requested_at > clock_timestamp() - interval '1 hour';
    IF n + cardinality(p_to) > p_cap THEN
        RETURN QUERY SELECT false, true, n, '{}'::bigint[], '[]'::jsonb;
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
    RETURN QUERY SELECT true, true, n, made, '[]'::jsonb;
END
$$;

-- 0016_reconcile: `unknown` recipients resolved from SES's own events (issue 25).
-- An `unknown` row is one whose provider call may or may not have reached SES. Every SES
-- event that names the row by its EmailTags (Send, Delivery, Bounce, Complaint: SES accepted
-- the message; Reject, RenderingFailure: it did not send it) resolves it: `sent` with the
-- event's message id, or `failed`. With PGCAST_RECONCILE_AFTER set, an `unknown` row with no
-- event that long after its handoff is put back to pending once (never twice): the operator
-- promises that the configuration set publishes Send events, so no event means SES never
-- accepted the message. Counters move in the transaction that moves the rows; each change is
-- in the broadcast's audit log.

-- how an unknown row was resolved (the SES event type, lowercased) or 'requeued'; NULL: never
-- unknown, or still unknown
ALTER TABLE broadcast_recipients ADD COLUMN reconciled text;
-- when the row was put back to pending for want of an event (at most once)
ALTER TABLE broadcast_recipients ADD COLUMN reconcile_requeued_at timestamptz;
-- unknown rows an event resolved, and unknown rows requeued for want of one (O(1) progress)
ALTER TABLE broadcasts ADD COLUMN unknown_resolved integer NOT NULL DEFAULT 0;
ALTER TABLE broadcasts ADD COLUMN unknown_requeued integer NOT NULL DEFAULT 0;

-- One SES event against one recipient row: resolves it when it is `unknown` (sent with the
-- message id for send, delivery, bounce, soft_bounce, complaint; failed for reject and
-- renderingfailure), else changes nothing. Lock order: the broadcast row, then the recipient
-- row (0005's). A broadcast that had ended `failed` (nobody sent) and gets a sent row ends
-- `sent`. Returns the row's new status, or NULL when nothing changed.
CREATE FUNCTION pgcast_reconcile_event_v1(p_broadcast uuid, p_contact bigint, p_event text,
                                          p_message_id text, p_at timestamptz, p_detail text)
RETURNS text
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    st text;
    outcome text;
BEGIN
    IF p_broadcast IS NULL OR p_contact IS NULL OR p_event NOT IN (
            'send', 'delivery', 'bounce', 'soft_bounce', 'complaint', 'reject',
            'renderingfailure') THEN
        RETURN NULL;
    END IF;
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_broadcast FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM 1 FROM broadcast_recipients r
    WHERE r.broadcast_id = p_broadcast AND r.contact_id = p_contact AND r.status = 'unknown'
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;  -- not unknown (never was, resolved already, or requeued): nothing twice
    END IF;
    outcome := CASE WHEN p_event IN ('reject', 'renderingfailure') THEN 'failed' ELSE 'sent' END;
    UPDATE broadcast_recipients r
    SET status = outcome, reconciled = p_event, claim_token = NULL,
        provider_message_id = CASE WHEN outcome = 'sent'
                                   THEN coalesce(p_message_id, r.provider_message_id) END,
        sent_at = CASE WHEN outcome = 'sent' THEN coalesce(r.handed_at, p_at) END,
        last_error = CASE WHEN outcome = 'failed'
                          THEN left('SES ' || p_event || coalesce(': ' || p_detail, ''), 500) END
    WHERE r.broadcast_id = p_broadcast AND r.contact_id = p_contact;
    UPDATE broadcasts AS u
    SET unknown = u.unknown - 1, unknown_resolved = u.unknown_resolved + 1,
        sent = u.sent + CASE WHEN outcome = 'sent' THEN 1 ELSE 0 END,
        failed = u.failed + CASE WHEN outcome = 'failed' THEN 1 ELSE 0 END,
        status = CASE WHEN u.status = 'failed' AND outcome = 'sent' THEN 'sent' ELSE u.status END,
        failed_reason = CASE WHEN u.status = 'failed' AND outcome = 'sent' THEN NULL
                             ELSE u.failed_reason END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('reconcile', u.status,
            CASE WHEN u.status = 'failed' AND outcome = 'sent' THEN 'sent' ELSE u.status END,
            jsonb_build_object('via', 'ses_event', 'contact', p_contact, 'event', p_event,
                               'message_id', p_message_id, 'outcome', outcome))
    WHERE u.id = p_broadcast;
    RETURN outcome;
END
$$;

-- pgcast_ses_event_v1 (the webhook's, once per SNS MessageId), then the reconciliation of the
-- row the event names, in the same transaction. p_ses_message_id: the event's mail.messageId.
CREATE FUNCTION pgcast_ses_event_v2(p_message_id text, p_topic text, p_sns_at timestamptz,
                                    p_prune_before timestamptz, p_event text, p_broadcast uuid,
                                    p_contact bigint, p_addresses text[], p_detail text,
                                    p_at timestamptz, p_soft_limit integer, p_guard_min integer,
                                    p_max_bounce double precision,
                                    p_max_complaint double precision, p_ses_message_id text)
RETURNS TABLE (outcome text, broadcast_id uuid, n_contacts integer, guard text,
               reconciled text)
LANGUAGE plpgsql AS $$
DECLARE
    v record;
BEGIN
    -- the webhook answers 200 once this commits, and SNS never sends that message again: a
    -- resolution lost to a crash would leave the row unknown, to be requeued and sent twice
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT * INTO v FROM pgcast_ses_event_v1(p_message_id, p_topic, p_sns_at, p_prune_before,
        p_event, p_broadcast, p_contact, p_addresses, p_detail, p_at, p_soft_limit,
        p_guard_min, p_max_bounce, p_max_complaint);
    RETURN QUERY SELECT v.outcome, v.broadcast_id, v.n_contacts, v.guard,
        CASE WHEN v.outcome <> 'duplicate' THEN pgcast_reconcile_event_v1(
            p_broadcast, p_contact, p_event, p_ses_message_id, p_at, p_detail) END;
END
$$;

-- Unknown rows of one broadcast handed off more than p_after ago, with no event since, and
-- never requeued before: back to pending (attempts kept), once. A finished broadcast goes
-- back to sending under a new epoch (as a retry does); a paused one stays paused; a cancelled
-- one is left alone. p_dry_run: count them, change nothing. Lock order: the broadcast row,
-- then the rows in contact_id order (one InitPlan), updated by key.
CREATE FUNCTION pgcast_reconcile_requeue_v1(p_id uuid, p_after interval, p_dry_run boolean,
                                            p_details jsonb)
RETURNS TABLE (broadcast_id uuid, status text, requeued integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    st text;
    ids bigint[];
    e integer;
BEGIN
    -- under the row lock retention's archive takes to mark it (0013): a broadcast marked
    -- for the archive is never requeued (its rows may already be detached), as a retry
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF st NOT IN ('sending', 'paused', 'sent', 'failed')
       OR EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = p_id
                  AND (b.archiving_at IS NOT NULL OR b.archived_at IS NOT NULL)) THEN
        RETURN QUERY SELECT p_id, st, 0;
        RETURN;
    END IF;
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'unknown'
          AND l.reconcile_requeued_at IS NULL
          AND coalesce(l.handed_at, '-infinity') < now() - p_after
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(ids) = 0 OR p_dry_run THEN
        RETURN QUERY SELECT p_id, st, cardinality(ids);
        RETURN;
    END IF;
    UPDATE broadcast_recipients r
    -- the claim token is kept, as retry v2 keeps it (0013): a late answer to the first call
    -- still finds the row (pgcast_record_v5) and is recorded, not lost
    SET status = 'pending', retry_at = NULL, claim_epoch = NULL,
        lease_expires_at = NULL, handed_at = NULL, provider_message_id = NULL,
        last_error = NULL, sent_at = NULL, reconciled = 'requeued',
        reconcile_requeued_at = now()
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcasts AS u
    SET status = CASE WHEN u.status IN ('sent', 'failed') THEN 'sending' ELSE u.status END,
        epoch = u.epoch + CASE WHEN u.status IN ('sent', 'failed') THEN 1 ELSE 0 END,
        finished_at = CASE WHEN u.status IN ('sent', 'failed') THEN NULL ELSE u.finished_at END,
        failed_reason = CASE WHEN u.status IN ('sent', 'failed') THEN NULL
                             ELSE u.failed_reason END,
        unknown = u.unknown - cardinality(ids),
        unknown_requeued = u.unknown_requeued + cardinality(ids), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('reconcile_requeue', u.status,
            CASE WHEN u.status IN ('sent', 'failed') THEN 'sending' ELSE u.status END,
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('requeued', cardinality(ids), 'after', p_after::text))
    WHERE u.id = p_id
    RETURNING u.epoch, u.status INTO e, st;
    PERFORM pgcast_notify_v1('retry', p_id, e);
    RETURN QUERY SELECT p_id, st, cardinality(ids);
END
$$;

-- 0013_retry_retention
ALTER TABLE broadcasts ADD COLUMN archiving_at timestamptz;

-- archive, step 1 (before the detach): a finished broadcast is marked for the archive under
-- its row lock, which a retry takes too; from then on a retry refuses it. Idempotent (an
-- interrupted run is finished by the next). False: not finished, or already archived.
CREATE FUNCTION pgcast_archive_begin_v1(p_id uuid)
RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    UPDATE broadcasts b
    SET archiving_at = coalesce(b.archiving_at, now()), updated_at = now()
    WHERE b.id = p_id AND b.status IN ('sent', 'failed', 'cancelled') AND b.archived_at IS NULL;
    RETURN FOUND;
END
$$;

-- finalize, v5: v4, and under the broadcast row lock the counters must account for every
-- recipient too. Rows the function cannot see (a partition detached by retention while a
-- retry put one of them back to pending) would otherwise read as drained.
CREATE FUNCTION pgcast_finalize_v5(p_id uuid)
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
    PERFORM 1 FROM broadcasts b
    WHERE b.id = p_id AND b.status = 'sending'
      AND b.total = b.sent + b.failed + b.skipped + b.unknown + b.cancelled
    FOR NO KEY UPDATE;
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
      AND u.total = u.sent + u.failed + u.skipped + u.unknown + u.cancelled
    RETURNING true, u.status;
END
$$;

-- retry, v2: v1, and
-- * a broadcast retention has marked for the archive (archiving_at, under this same row
--   lock) is refused (`archiving`): its partition may be detached already;
-- * with p_include_unknown, an unknown row handed off less than p_in_doubt seconds ago (the
--   worker's lease plus the provider's timeout) is left as it is (`in_doubt` counts them):
--   its call may still be answered;
-- * an unknown row it requeues keeps its claim token, so a late answer to that call still
--   finds it (pgcast_record_v5); a failed row's answer is in, its token goes.
CREATE FUNCTION pgcast_retry_v2(p_account text, p_id uuid, p_include_unknown boolean,
                                p_in_doubt double precision, p_details jsonb)
RETURNS TABLE (ok boolean, status text, requeued integer, in_doubt integer, archiving boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    st text;
    arch boolean;
    ids bigint[];
    n_unknown integer;
    n_doubt integer := 0;
    cutoff timestamptz;
    e integer;
BEGIN
    -- an acknowledged retry is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT b.status, b.archiving_at IS NOT NULL OR b.archived_at IS NOT NULL INTO st, arch
    FROM broadcasts b WHERE b.id = p_id AND b.account = p_account
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF st NOT IN ('sent', 'failed') OR arch THEN
        RETURN QUERY SELECT false, st, 0, 0, arch;
        RETURN;
    END IF;
    cutoff := clock_timestamp() - make_interval(secs => greatest(p_in_doubt, 0));
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL
          AND l.status IN ('failed', 'unknown')
          AND (l.status = 'failed'
               OR (p_include_unknown AND (l.handed_at IS NULL OR l.handed_at <= cutoff)))
        ORDER BY l.contact_id FOR UPDATE);
    IF p_include_unknown THEN
        -- a record of these rows takes the broadcast row first: this count is stable
        SELECT count(*) INTO n_doubt FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'unknown'
          AND l.handed_at > cutoff;
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN QUERY SELECT false, st, 0, n_doubt, false;
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE r.status = 'unknown') INTO n_unknown
    FROM broadcast_recipients r WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcast_recipients r
    SET status = 'pending', attempts = 0, retry_at = NULL,
        claim_token = CASE WHEN r.status = 'unknown' THEN r.claim_token END,
        claim_epoch = NULL, lease_expires_at = NULL, handed_at = NULL,
        provider_message_id = NULL, last_error = NULL, sent_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcasts AS u
    SET status = 'sending', epoch = u.epoch + 1,
        failed = u.failed - (cardinality(ids) - n_unknown), unknown = u.unknown - n_unknown,
        failure_streak = 0, paused_reason = NULL, failed_reason = NULL, finished_at = NULL,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('retry', u.status, 'sending',
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('requeued', cardinality(ids),
                                  'failed', cardinality(ids) - n_unknown,
                                  'unknown', n_unknown, 'include_unknown', p_include_unknown)
            || CASE WHEN p_include_unknown
                    THEN jsonb_build_object('in_doubt', n_doubt, 'in_doubt_seconds', p_in_doubt)
                    ELSE '{}'::jsonb END)
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sent', 'failed'])
    RETURNING u.epoch INTO e;
    PERFORM pgcast_notify_v1('retry', p_id, e);
    RETURN QUERY SELECT true, 'sending'::text, cardinality(ids), n_doubt, false;
END
$$;
DROP FUNCTION pgcast_retry_v1(text, uuid, boolean, jsonb);

-- record, v5: v4, and an answer for a row this claim no longer holds is never dropped
-- silently. Such a row was requeued by a retry while its call was still out (an `unknown`
-- row, or a DBA's change): the answer is appended to the broadcast's audit log (contact,
-- outcome, provider message id, the row's status then; not the error text, which may quote
-- the address), and a `sent` answer for a row still `pending` under this claim's token (a
-- retry keeps it; nobody has claimed the row again) records it sent: the contact has the
-- email, and no second one goes. All of the group's rows are locked in one pass, in
-- contact_id order, after the broadcast row (lock order).
CREATE FUNCTION pgcast_record_v5(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
                                 p_message_ids text[], p_errors text[], p_retry_in double precision[],
                                 p_breaker integer)
RETURNS TABLE (recorded integer, tripped boolean)
LANGUAGE plpgsql
SET enable_nestloop = off
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    locked bigint[];
    late bigint[];
    late_status jsonb;
    applied bigint[] := '{}';
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
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_id FOR NO KEY UPDATE;
    is_cancelled := st = 'cancelled';
    is_finished := st IN ('sent', 'failed');
    -- every row of the group, one pass; `mine`: still held by this claim (those the sweeper
    -- already counted unknown are corrected by their late outcome)
    SELECT coalesce(array_agg(l.contact_id) FILTER (WHERE l.mine), '{}'),
           count(*) FILTER (WHERE l.mine AND l.status = 'unknown'),
           coalesce(array_agg(l.contact_id) FILTER (WHERE NOT l.mine), '{}'),
           coalesce(jsonb_object_agg(l.contact_id::text, l.status) FILTER (WHERE NOT l.mine),
                    '{}')
    INTO locked, was_unknown, late, late_status
    FROM (SELECT r.contact_id, r.status,
                 coalesce(r.claim_token = p_token AND r.status IN ('sending', 'unknown'),
                          false) AS mine
          FROM broadcast_recipients r
          WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids)
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
    IF cardinality(late) > 0 THEN
        -- a late `sent` for a requeued row nobody has claimed again: recorded, not re-sent
        WITH upd AS (
            UPDATE broadcast_recipients r
            SET status = 'sent', attempts = r.attempts + 1, provider_message_id = res.message_id,
                last_error = NULL, sent_at = now(), retry_at = NULL, lease_expires_at = NULL
            FROM unnest(p_ids, p_outcomes, p_message_ids)
                AS res(contact_id, outcome, message_id)
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (late)
              AND r.contact_id = res.contact_id AND res.outcome = 'sent'
              AND r.status = 'pending' AND r.claim_token = p_token
              AND st IN ('sending', 'paused')
            RETURNING r.contact_id
        )
        SELECT coalesce(array_agg(u.contact_id), '{}') INTO applied FROM upd u;
    END IF;
    UPDATE broadcasts
    SET sent = sent + c.n_sent + cardinality(applied), failed = failed + c.n_failed,
        -- a late answer that says sent: the broadcast did reach somebody after all
        status = CASE WHEN status = 'failed' AND c.n_sent > 0 THEN 'sent' ELSE status END,
        audit_log = audit_log
            || CASE WHEN status = 'failed' AND c.n_sent > 0
                    THEN pgcast_audit_v1('late_sent', 'failed', 'sent',
                                         jsonb_build_object('sent', c.n_sent))
                    ELSE '[]'::jsonb END
            || CASE WHEN cardinality(late) > 0
                    THEN pgcast_audit_v1('late_answer', status, status, jsonb_build_object(
                        'claim_token', p_token,
                        'answers', (SELECT jsonb_agg(jsonb_build_object(
                                        'contact_id', res.contact_id, 'outcome', res.outcome,
                                        'provider_message_id', res.message_id,
                                        'row_status', late_status ->> res.contact_id::text,
                                        'recorded', res.contact_id = ANY (applied))
                                        ORDER BY res.contact_id)
                                    FROM unnest(p_ids, p_outcomes, p_message_ids)
                                        AS res(contact_id, outcome, message_id)
                                    WHERE res.contact_id = ANY (late))))
                    ELSE '[]'::jsonb END,
        unknown = unknown + c.n_unknown - was_unknown, cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN c.n_sent + cardinality(applied) > 0 THEN 0
                              ELSE failure_streak + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT (c.n + cardinality(applied))::integer, p_breaker > 0 AND streak > p_breaker;
END
$$;
DROP FUNCTION pgcast_record_v4(uuid, uuid, bigint[], text[], text[], text[], double precision[],
                               integer);

-- take, v3: v2, committed asynchronously (see the comment in the body).
CREATE FUNCTION pgcast_take_tokens_v3(p_name text, p_want integer, p_broadcast uuid)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    recent timestamptz;
    have double precision;
    g integer;
    acct text;
    prio double precision;
    w double precision;
    quantum double precision;
    fair double precision := 'Infinity';
    a_row rate_account_shares%ROWTYPE;
    b_row rate_broadcast_shares%ROWTYPE;
    a_new boolean;
    b_new boolean;
    a_min double precision;
    b_min double precision;
    a_start double precision;
    b_start double precision;
BEGIN
    -- No fsync under the rate lock: a synchronous commit releases its locks only after its
    -- WAL is flushed, so every take of every process queued behind each take's fsync. A
    -- grant is only used by a handoff, which commits synchronously after it; WAL is linear,
    -- so that flush makes the grant durable first. A crash can lose only grants no handoff
    -- acted on (the bucket as if they had not been taken), never a grant a call went out on.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision, false;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    SELECT br.account, br.priority INTO acct, prio FROM broadcasts br WHERE br.id = p_broadcast;
    IF acct IS NULL THEN
        -- floor before the cast: a burst beyond an integer's range must not fail the take
        g := floor(greatest(0, least(p_want::double precision, have)))::integer;
        UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
        RETURN QUERY SELECT g, CASE WHEN g > 0 THEN 0.0 ELSE (1 - (have - g)) / b.rate END, false;
        RETURN;
    END IF;
    w := coalesce((SELECT rw.weight FROM rate_weights rw WHERE rw.account = acct), 1);
    recent := t - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst));
    quantum := greatest(1, b.burst / 2);

    -- the most-behind waiting peers
    SELECT min(s.vtime) INTO a_min FROM rate_account_shares s
    WHERE s.bucket = p_name AND s.account <> acct AND s.waiting_at > recent;
    SELECT min(s.vtime) INTO b_min FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.account = acct AND s.broadcast_id <> p_broadcast
      AND s.waiting_at > recent;

    -- this taker's rows; one that was not waiting starts at the clock (no banked credit)
    SELECT * INTO a_row FROM rate_account_shares s WHERE s.bucket = p_name AND s.account = acct;
    a_new := NOT FOUND;
    IF a_new THEN
        a_row.bucket := p_name;
        a_row.account := acct;
        a_row.vtime := b.vclock;
        a_row.vclock := 0;
    ELSIF a_row.waiting_at IS NULL OR a_row.waiting_at <= recent THEN
        a_row.vtime := greatest(a_row.vtime, b.vclock);
    END IF;
    SELECT * INTO b_row FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    b_new := NOT FOUND;
    IF b_new THEN
        b_row.bucket := p_name;
        b_row.broadcast_id := p_broadcast;
        b_row.account := acct;
        b_row.vtime := a_row.vclock;
    ELSIF b_row.waiting_at IS NULL OR b_row.waiting_at <= recent THEN
        b_row.vtime := greatest(b_row.vtime, a_row.vclock);
    END IF;

    -- tokens this taker may have before it runs a quantum ahead of a waiting peer
    IF a_min IS NOT NULL THEN
        fair := least(fair, quantum - (a_row.vtime - a_min) * w);
    END IF;
    IF b_min IS NOT NULL THEN
        fair := least(fair, quantum - (b_row.vtime - b_min) * prio);
    END IF;
    IF fair >= 1 THEN
        g := floor(greatest(0, least(p_want::double precision, have, fair)))::integer;
    ELSIF have >= b.burst - 1 THEN
        -- ahead, but the bucket is about to be full: what it would otherwise lose, the tokens
        -- above half of it (at least one, so a bucket of one or two loses nothing either)
        g := floor(greatest(0, least(p_want::double precision, have,
                                     greatest(have - b.burst / 2, 1))))::integer;
    ELSE
        g := 0;
    END IF;

    a_start := a_row.vtime;
    b_start := b_row.vtime;
    a_row.vtime := a_row.vtime + g / w;
    b_row.vtime := b_row.vtime + g / prio;
    a_row.asked_at := t;
    b_row.asked_at := t;
    IF g < p_want THEN
        a_row.waiting_at := t;
        b_row.waiting_at := t;
    END IF;
    IF g > 0 THEN
        a_row.vclock := greatest(a_row.vclock, b_start);
    END IF;
    IF a_new THEN
        INSERT INTO rate_account_shares (bucket, account, vtime, vclock, asked_at, waiting_at)
        VALUES (p_name, acct, a_row.vtime, a_row.vclock, t, a_row.waiting_at);
    ELSE
        UPDATE rate_account_shares s
        SET vtime = a_row.vtime, vclock = a_row.vclock, asked_at = t, waiting_at = a_row.waiting_at
        WHERE s.bucket = p_name AND s.account = acct;
    END IF;
    IF b_new THEN
        INSERT INTO rate_broadcast_shares (bucket, broadcast_id, account, vtime, asked_at,
                                           waiting_at)
        VALUES (p_name, p_broadcast, acct, b_row.vtime, t, b_row.waiting_at);
    ELSE
        UPDATE rate_broadcast_shares s
        SET vtime = b_row.vtime, asked_at = t, waiting_at = b_row.waiting_at
        WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    END IF;
    UPDATE rate_limits
    SET tokens = have - g, refilled_at = t,
        vclock = CASE WHEN g > 0 THEN greatest(vclock, a_start) ELSE vclock END
    WHERE name = p_name;
    RETURN QUERY SELECT g, CASE
        WHEN g > 0 THEN 0.0
        WHEN have < 1 THEN (1 - have) / b.rate
        -- ahead of a waiting peer: it is served first; look again when the bucket is full
        ELSE greatest(1 - (have - floor(have)), b.burst - 1 - have) / b.rate END,
        g = 0 AND have >= 1;
END
$$;
DROP FUNCTION pgcast_take_tokens_v2(text, integer, uuid);

-- prune, v2: one cutoff per bucket, read once under its lock. v1 read clock_timestamp() for
-- each DELETE: an account row asked at between the two cutoffs was forgotten while its
-- broadcasts' rows (asked at the same time) were kept, and a broadcast kept its old virtual
-- time against a restarted account clock: far ahead of its new siblings. An account's
-- asked_at is the latest of its broadcasts', so with one cutoff an account row goes only
-- with all of its broadcasts' rows.
CREATE FUNCTION pgcast_rate_prune_v2() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    bk text;
    cutoff timestamptz;
    n integer := 0;
    k integer;
BEGIN
    FOR bk IN SELECT bucket FROM rate_account_shares UNION SELECT bucket FROM rate_broadcast_shares
              ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(bk));
        cutoff := clock_timestamp() - interval '1 minute';
        DELETE FROM rate_broadcast_shares WHERE bucket = bk AND asked_at < cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
        DELETE FROM rate_account_shares WHERE bucket = bk AND asked_at < cutoff;
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;
DROP FUNCTION pgcast_rate_prune_v1();

-- Who set a bucket's rate: operator_set_at is when an operator last did (`pgcast rate set`,
-- a DBA's UPDATE of rate or burst, any INSERT), NULL while only a worker's start has (or
-- nobody). A worker's PGCAST_RATE is a starting value for a bucket nobody set: it never
-- undoes the operator's rate (pgcast_rate_start_v1).
ALTER TABLE rate_limits ADD COLUMN operator_set_at timestamptz;

CREATE FUNCTION pgcast_rate_operator_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- pgcast_rate_start_v1 says, for its own transaction, that a worker writes
    IF current_setting('pgcast.rate_writer', true) IS DISTINCT FROM 'worker' THEN
        NEW.operator_set_at := now();
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER rate_limits_operator BEFORE INSERT OR UPDATE OF rate, burst ON rate_limits
    FOR EACH ROW EXECUTE FUNCTION pgcast_rate_operator_v1();

-- a worker's start: its PGCAST_RATE (or its provider's limit) for a bucket no operator has
-- set; a bucket an operator set keeps its rate, except that with p_ceiling (SES's own limit)
-- a higher or unlimited rate is lowered to it (SES would throttle above it anyway). Under
-- the bucket's rate lock. `applied`: the bucket now has p_rate.
CREATE FUNCTION pgcast_rate_start_v1(p_name text, p_rate double precision,
                                     p_burst double precision, p_ceiling boolean)
RETURNS TABLE (rate double precision, burst double precision, applied boolean,
               operator_set_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
    cur rate_limits%ROWTYPE;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    PERFORM set_config('pgcast.rate_writer', 'worker', true);
    SELECT * INTO cur FROM rate_limits l WHERE l.name = p_name FOR UPDATE;
    IF NOT FOUND OR cur.operator_set_at IS NULL
       OR (p_ceiling AND (cur.rate = 0 OR cur.rate > p_rate)) THEN
        INSERT INTO rate_limits AS r (name, rate, burst, tokens)
        VALUES (p_name, p_rate, p_burst, p_burst)
        ON CONFLICT (name) DO UPDATE
        SET rate = EXCLUDED.rate, burst = EXCLUDED.burst,
            tokens = least(r.tokens, EXCLUDED.burst), updated_at = now();
        PERFORM set_config('pgcast.rate_writer', '', true);
        RETURN QUERY SELECT p_rate, p_burst, true, cur.operator_set_at;
        RETURN;
    END IF;
    PERFORM set_config('pgcast.rate_writer', '', true);
    RETURN QUERY SELECT cur.rate, cur.burst, false, cur.operator_set_at;
END
$$;

-- claim and hand off, v4: v3, and only while the global bucket is unlimited when it runs
-- (read after the fence). A claim decided under rate 0 whose statement waited while an
-- operator set a rate hands off nothing: its rows come back claimed (handed = false) and
-- take tokens group by group. `global_rate`: the rate it read, for the worker's state.
CREATE FUNCTION pgcast_claim_handoff_v4(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint,
               global_rate double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
    lim double precision;
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
    -- read after the fence: a global rate set while this waited (0 -> N) applies to
    -- these rows; they are then only claimed, and go through the bucket group by group
    lim := coalesce((SELECT l.rate FROM rate_limits l WHERE l.name = 'global'), 0);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable AND lim = 0 THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable AND lim = 0 THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name, coalesce(ct.attributes, '{}') AS attributes,
                 coalesce(ct.tags, '{}') AS tags, ct.id IS NOT NULL AND ct.unsubscribed_at IS NULL AND ct.suppressed_at IS NULL
                     AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e,
              k.mailable AND lim = 0, c.last_fresh, lim;
END
$$;
DROP FUNCTION pgcast_claim_handoff_v3(uuid, integer, uuid, text, interval, bigint);

-- 0017_messages: transactional messages (issue 26). One email to one address, written in the
-- transaction of the change that causes it (the outbox pattern), delivered by the same workers
-- as broadcast recipients: claimed with SKIP LOCKED, handed off behind a fence that commits
-- before the provider call, recorded. `queued` rows are claimed by setting a claim token and
-- pushing not_before to the lease's end (a claim whose worker died is claimable again when its
-- lease ends, with no sweep); `sending` rows whose lease ended are `unknown`, never re-sent.
-- Categories: transactional (the default) and confirmation (double opt-in mail) go to
-- unsubscribed contacts; marketing does not. Suppressed and erased addresses are skipped.
-- Messages take tokens from the global bucket ahead of broadcasts, up to messages_share of
-- the rate while broadcasts are waiting.

CREATE TABLE messages (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account             text        NOT NULL,
    idempotency_key     text,
    category            text        NOT NULL DEFAULT 'transactional',
    status              text        NOT NULL DEFAULT 'queued',
    to_address          text        NOT NULL,
    from_address        text        NOT NULL,
    reply_to            text,
    subject             text        NOT NULL,
    text_body           text,
    html_body           text,
    -- extra headers (an allow-list checked by the API) and SES EmailTags, as JSON objects
    headers             jsonb       NOT NULL DEFAULT '{}',
    tags                jsonb       NOT NULL DEFAULT '{}',
    -- provider calls that counted (sent, failed, retried, unknown; a throttle does not)
    attempts            smallint    NOT NULL DEFAULT 0,
    -- a queued row is claimable from then on: its retry time, or its claim's lease end
    not_before          timestamptz NOT NULL DEFAULT clock_timestamp(),
    claim_token         uuid,
    worker              text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the handoff: the fence passed, the provider call about to start
    handed_at           timestamptz,
    sent_at             timestamptz,
    finished_at         timestamptz,
    provider_message_id text,
    last_error          text,
    -- feedback from the provider (SES events), by provider_message_id
    delivered_at        timestamptz,
    bounced_at          timestamptz,
    complained_at       timestamptz,
    feedback_detail     text,
    CONSTRAINT messages_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT messages_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT messages_category_check
        CHECK (category IN ('transactional', 'marketing', 'confirmation')),
    CONSTRAINT messages_status_check
        CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'unknown', 'skipped')),
    CONSTRAINT messages_body_check CHECK (text_body IS NOT NULL OR html_body IS NOT NULL),
    CONSTRAINT messages_headers_check CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT messages_tags_check CHECK (jsonb_typeof(tags) = 'object'),
    CONSTRAINT messages_worker_check CHECK (claim_token IS NULL OR worker IS NOT NULL)
);
-- one message per key and account (a NULL key: no idempotency)
CREATE UNIQUE INDEX messages_account_key ON messages (account, idempotency_key);
CREATE INDEX messages_account_created ON messages (account, created_at);
-- the claimable rows: queued ones, by when they may be claimed
CREATE INDEX messages_claimable ON messages (not_before) WHERE status = 'queued';
-- the rows in the provider's hands, for the sweep that makes lost ones unknown
CREATE INDEX messages_in_flight ON messages (lease_expires_at) WHERE status = 'sending';
CREATE INDEX messages_provider_id ON messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- For DBAs and GET /messages/{id}: one row per message, without its bodies.
CREATE VIEW message_status AS
SELECT id, account, category, status, to_address, from_address, subject, idempotency_key,
       attempts, last_error AS error, provider_message_id, created_at, handed_at, sent_at,
       finished_at, delivered_at, bounced_at, complained_at, feedback_detail,
       CASE WHEN status = 'queued' AND claim_token IS NOT NULL
                 AND lease_expires_at > clock_timestamp() THEN true ELSE false END AS claimed
FROM messages;

-- Enqueue one message (the versioned implementation of pgcast_send_message). Validates what
-- it can (an address with one @, a subject, a body, the category, the senders rule on from),
-- raising SQLSTATE 22023 with a clear message. An address erased from the account is never
-- stored: the row is `skipped` with the placeholder address and no subject or bodies. The same key again (committed,
-- or committing in another session: ON CONFLICT waits for it) returns the first message,
-- created = false. A new queued message NOTIFYs the workers (one notification a transaction:
-- Postgres folds equal payloads).
CREATE FUNCTION pgcast_send_message_v1(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, created boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := btrim(coalesce(p_to, ''));
    sender text;
    allowed text[];
    mid uuid;
    st text;
    erased boolean;
BEGIN
    IF p_account IS NULL OR char_length(p_account) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'account must be 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF addr !~ '^[^@\s<>(),;:"\[\]\\]+@[^@\s<>(),;:"\[\]\\]+\.[^@\s<>(),;:"\[\]\\]+$'
       OR char_length(addr) > 254 THEN
        RAISE EXCEPTION 'to: % is not an email address', p_to USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_subject, '')) = '' THEN
        RAISE EXCEPTION 'subject must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_text IS NULL AND p_html IS NULL THEN
        RAISE EXCEPTION 'a message needs a text or an html body' USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_from, '')) = '' THEN
        RAISE EXCEPTION 'from must not be empty' USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_category, '') NOT IN ('transactional', 'marketing', 'confirmation') THEN
        RAISE EXCEPTION 'category must be transactional, marketing or confirmation, not %',
            p_category USING ERRCODE = '22023';
    END IF;
    -- the senders rule (0015): with senders, the From's address must be one or at one
    allowed := ARRAY(SELECT s.sender FROM senders s WHERE s.account = p_account);
    IF cardinality(allowed) > 0 THEN
        sender := lower(btrim(coalesce(substring(p_from FROM '<([^<>]*)>\s*$'), p_from)));
        IF NOT (sender = ANY (allowed) OR split_part(sender, '@', 2) = ANY (allowed)) THEN
            RAISE EXCEPTION 'from: % is not a sender this account may use', sender
                USING ERRCODE = '22023',
                      HINT = 'an operator allows more with `pgcast senders add`';
        END IF;
    END IF;
    -- an erase cannot commit between this check and the insert
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    erased := pgcast_erased_v1(p_account, addr);
    INSERT INTO messages AS m (account, idempotency_key, category, status, to_address,
                               from_address, reply_to, subject, text_body, html_body, headers,
                               tags, last_error, finished_at)
    VALUES (p_account, p_key, p_category, CASE WHEN erased THEN 'skipped' ELSE 'queued' END,
            CASE WHEN erased THEN 'erased@erased.invalid' ELSE addr END, btrim(p_from),
            CASE WHEN NOT erased THEN p_reply_to END,
            CASE WHEN erased THEN '(erased)' ELSE p_subject END,
            CASE WHEN erased THEN '' ELSE p_text END, CASE WHEN NOT erased THEN p_html END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_headers, '{}') END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_tags, '{}') END,
            CASE WHEN erased THEN 'contact erased' END,
            CASE WHEN erased THEN clock_timestamp() END)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING m.id, m.status INTO mid, st;
    IF mid IS NOT NULL THEN
        IF st = 'queued' THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names applications call inside their own transactions (never renamed; each
-- wraps the current version). Returns the message's id.
CREATE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                    text_body text, html_body text, from_address text,
                                    idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v1(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                    text_body text, html_body text, from_address text,
                                    idempotency_key text, category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v1(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- Claim up to p_limit claimable messages for one worker: the claim token, the lease (its end
-- is also when the row is claimable again). SKIP LOCKED, in a CTE (bug #15715). May commit
-- asynchronously: a crash can only lose the claim (the rows stay claimable).
CREATE FUNCTION pgcast_message_claim_v1(p_limit integer, p_token uuid, p_worker text,
                                        p_lease interval)
RETURNS TABLE (id uuid, attempts smallint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM messages q
        WHERE q.status = 'queued' AND q.not_before <= clock_timestamp()
        ORDER BY q.not_before
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE messages m
    SET claim_token = p_token, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease,
        not_before = clock_timestamp() + p_lease
    FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.attempts;
END
$$;

-- The fence before the provider call: this claim's queued rows whose lease holds move to
-- sending; those whose address is suppressed or erased in the account, or unsubscribed for a
-- `marketing` message, go to skipped with the reason. Under the contacts fence of each
-- account (shared; exclusive in every writer of the columns read), rows locked in id order.
-- Synchronous whatever the configuration; committed before the provider is called.
CREATE FUNCTION pgcast_message_handoff_v1(p_token uuid, p_ids uuid[])
RETURNS TABLE (id uuid, account text, category text, to_address text, from_address text,
               reply_to text, subject text, text_body text, html_body text, headers jsonb,
               tags jsonb, attempts smallint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    FOR acct IN SELECT DISTINCT m.account FROM messages m WHERE m.id = ANY (p_ids)
                ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    END LOOP;
    locked := ARRAY(
        SELECT m.id FROM messages m
        WHERE m.id = ANY (p_ids) AND m.status = 'queued' AND m.claim_token = p_token
          AND m.lease_expires_at > clock_timestamp()
        ORDER BY m.id FOR UPDATE);
    UPDATE messages m
    SET status = 'skipped', finished_at = clock_timestamp(), claim_token = NULL,
        lease_expires_at = NULL, last_error = g.why
    FROM (SELECT q.id,
                 CASE WHEN q.to_address = 'erased@erased.invalid'
                           OR pgcast_erased_v1(q.account, q.to_address) THEN 'contact erased'
                      WHEN c.suppressed_at IS NOT NULL
                           THEN 'suppressed: ' || c.suppressed_reason
                      WHEN c.unsubscribed_at IS NOT NULL AND q.category = 'marketing'
                           THEN 'unsubscribed'
                 END AS why
          FROM messages q
          LEFT JOIN contacts c ON c.account = q.account AND lower(c.email) = lower(q.to_address)
          WHERE q.id = ANY (locked)) g
    WHERE m.id = g.id AND g.why IS NOT NULL;
    RETURN QUERY
    UPDATE messages m SET status = 'sending', handed_at = clock_timestamp()
    WHERE m.id = ANY (locked) AND m.status = 'queued'
    RETURNING m.id, m.account, m.category, m.to_address, m.from_address, m.reply_to,
              m.subject, m.text_body, m.html_body, m.headers, m.tags, m.attempts;
END
$$;

-- Claimed rows not handed off go back (claimable at once, no attempt counted).
CREATE FUNCTION pgcast_message_release_v1(p_token uuid, p_ids uuid[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE messages m
    SET claim_token = NULL, lease_expires_at = NULL, not_before = clock_timestamp()
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q WHERE q.id = ANY (p_ids)
                            AND q.status = 'queued' AND q.claim_token = p_token
                            ORDER BY q.id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The outcomes of one claim's calls: sent (the provider's id), failed, unknown (maybe sent:
-- never re-sent), retry (queued again after retry_in, an attempt), throttled (queued again
-- after retry_in, not an attempt), release (queued again at once, never called). Only rows
-- this claim handed off. May commit asynchronously: a crash leaves rows `sending`, which
-- the sweep makes `unknown` (never re-sent).
CREATE FUNCTION pgcast_message_record_v1(p_token uuid, p_ids uuid[], p_outcomes text[],
                                         p_message_ids text[], p_errors text[],
                                         p_retry_in double precision[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET status = CASE o.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed'
                                WHEN 'unknown' THEN 'unknown' ELSE 'queued' END,
        attempts = m.attempts + CASE WHEN o.outcome IN ('throttled', 'release') THEN 0 ELSE 1 END,
        provider_message_id = coalesce(o.message_id, m.provider_message_id),
        last_error = CASE WHEN o.outcome = 'sent' THEN NULL ELSE o.error END,
        sent_at = CASE WHEN o.outcome = 'sent' THEN clock_timestamp() ELSE m.sent_at END,
        finished_at = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown')
                           THEN clock_timestamp() END,
        claim_token = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown') THEN m.claim_token END,
        lease_expires_at = NULL,
        not_before = CASE WHEN o.outcome IN ('retry', 'throttled', 'release')
                          THEN clock_timestamp() + make_interval(secs => coalesce(o.retry_in, 0))
                          ELSE m.not_before END
    FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
         AS o(id, outcome, message_id, error, retry_in)
    WHERE m.id = o.id AND m.status = 'sending' AND m.claim_token = p_token;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Extends the leases of a live worker's claims (by claim token, never by worker).
CREATE FUNCTION pgcast_message_renew_v1(p_tokens uuid[], p_lease interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET lease_expires_at = clock_timestamp() + p_lease,
        not_before = CASE WHEN m.status = 'queued' THEN clock_timestamp() + p_lease
                          ELSE m.not_before END
    WHERE m.claim_token = ANY (p_tokens) AND m.status IN ('queued', 'sending')
      AND m.lease_expires_at > clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Rows a dead worker left in the provider's hands (sending, lease over): unknown, never
-- re-sent. Returns how many.
CREATE FUNCTION pgcast_message_sweep_v1()
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE messages m
    SET status = 'unknown', finished_at = clock_timestamp(), lease_expires_at = NULL,
        attempts = m.attempts + 1,
        last_error = 'in doubt: the worker was lost after the handoff (maybe sent; never re-sent)'
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q
                            WHERE q.status = 'sending' AND q.lease_expires_at < clock_timestamp()
                            ORDER BY q.id FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- One SES event about a message, by the provider's message id: delivered, bounced or
-- complained noted with its time and detail; a message still `unknown` that SES accepted
-- (any event but reject and renderingfailure) becomes `sent`, one it did not becomes
-- `failed`. Returns the message's id (NULL: no message has that provider id).
CREATE FUNCTION pgcast_message_feedback_v1(p_provider_id text, p_event text, p_at timestamptz,
                                           p_detail text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    mid uuid;
BEGIN
    UPDATE messages m
    SET delivered_at = CASE WHEN p_event = 'delivery' THEN coalesce(m.delivered_at, p_at)
                            ELSE m.delivered_at END,
        bounced_at = CASE WHEN p_event IN ('bounce', 'soft_bounce')
                          THEN coalesce(m.bounced_at, p_at) ELSE m.bounced_at END,
        complained_at = CASE WHEN p_event = 'complaint' THEN coalesce(m.complained_at, p_at)
                             ELSE m.complained_at END,
        feedback_detail = CASE WHEN p_event IN ('bounce', 'soft_bounce', 'complaint')
                               THEN coalesce(p_detail, m.feedback_detail)
                               ELSE m.feedback_detail END,
        status = CASE WHEN m.status <> 'unknown' THEN m.status
                      WHEN p_event IN ('reject', 'renderingfailure') THEN 'failed'
                      ELSE 'sent' END
    WHERE m.provider_message_id = p_provider_id
    RETURNING m.id INTO mid;
    RETURN mid;
END
$$;

-- erase, v4: v3, then the address taken out of the account's messages in the same
-- transaction: a queued one is skipped, and every one keeps only the placeholder address, no
-- subject and no bodies. After v3's locks (the erasure lock, the contact row, the contacts
-- fence when there is a contact), so the message rows come last, as the recipient rows do:
-- a message handoff takes the contacts fence before its rows.
CREATE FUNCTION pgcast_erase_v4(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v record;
    n bigint;
BEGIN
    SELECT * INTO v FROM pgcast_erase_v3(p_account, p_email, p_source, p_actor);
    UPDATE messages m
    SET to_address = 'erased@erased.invalid', subject = '(erased)', text_body = '',
        html_body = NULL, headers = '{}', tags = '{}', reply_to = NULL,
        status = CASE WHEN m.status = 'queued' THEN 'skipped' ELSE m.status END,
        last_error = CASE WHEN m.status = 'queued' THEN 'contact erased' ELSE m.last_error END,
        finished_at = coalesce(m.finished_at, clock_timestamp()),
        claim_token = CASE WHEN m.status = 'queued' THEN NULL ELSE m.claim_token END
    WHERE m.account = p_account AND lower(m.to_address) = lower(btrim(p_email));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN QUERY SELECT v.contact_id, v.recipients, n;
END
$$;

-- Priority in the one bucket. Messages (and outside senders) take from the global bucket
-- ahead of broadcasts: while they wait, a broadcast's take leaves them what they asked for,
-- up to their credit. Their credit refills at messages_share x rate (up to that share of the
-- burst, at least one token) and caps them only while broadcasts are waiting; with no
-- broadcast waiting they may use the whole rate.
ALTER TABLE rate_limits ADD COLUMN messages_share double precision NOT NULL DEFAULT 0.5
    CONSTRAINT rate_limits_messages_share_check CHECK (messages_share BETWEEN 0 AND 1);
ALTER TABLE rate_limits ADD COLUMN messages_credit double precision NOT NULL DEFAULT 1;
ALTER TABLE rate_limits ADD COLUMN messages_refilled_at timestamptz NOT NULL
    DEFAULT clock_timestamp();
ALTER TABLE rate_limits ADD COLUMN messages_waiting_at timestamptz;
ALTER TABLE rate_limits ADD COLUMN messages_want integer NOT NULL DEFAULT 0;

-- Up to p_want tokens for messages from bucket p_name, under the bucket's rate lock. Committed
-- asynchronously, as pgcast_take_tokens_v3 (the handoff after it flushes it).
CREATE FUNCTION pgcast_take_tokens_messages_v1(p_name text, p_want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    credit double precision;
    cap double precision;
    limited boolean;
    g integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    cap := greatest(1, b.burst * b.messages_share);
    credit := least(cap, b.messages_credit + greatest(0, extract(epoch FROM
                    t - b.messages_refilled_at)) * b.rate * b.messages_share);
    -- broadcasts waiting: a broadcast's take that got less than it asked for lately
    limited := EXISTS (SELECT 1 FROM rate_broadcast_shares s
                       WHERE s.bucket = p_name AND s.waiting_at >
                             t - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst)));
    g := floor(greatest(0, least(p_want::double precision, have,
                                 CASE WHEN limited THEN credit ELSE p_want END)))::integer;
    UPDATE rate_limits
    SET tokens = have - g, refilled_at = t, messages_credit = greatest(0, credit - g),
        messages_refilled_at = t,
        messages_waiting_at = CASE WHEN g < p_want THEN t END,
        messages_want = p_want - g
    WHERE name = p_name;
    RETURN QUERY SELECT g, CASE
        WHEN g > 0 THEN 0.0
        WHEN have < 1 THEN (1 - have) / b.rate
        WHEN b.messages_share = 0 THEN 1.0
        ELSE (1 - credit) / (b.rate * b.messages_share) END;
END
$$;

-- The stable name for mail that leaves through software other than pgcast: up to n tokens
-- from the global bucket, with the priority of messages. Call it before each send (or group)
-- and send only `granted`; wait wait_seconds when it is 0.
CREATE FUNCTION pgcast_take_tokens_external(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE sql AS $$
    SELECT * FROM pgcast_take_tokens_messages_v1('global', n)
$$;

-- take, v4: v3, leaving messages what they wait for. While a message taker waits (it asked
-- within the waiting horizon and got less than it wanted), a broadcast's take sees the bucket
-- less the tokens the messages want, up to their credit.
CREATE FUNCTION pgcast_take_tokens_v4(p_name text, p_want integer, p_broadcast uuid)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    reserve double precision;
    credit double precision;
    held double precision;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 OR b.messages_waiting_at IS NULL OR b.messages_want <= 0
       OR b.messages_waiting_at <= clock_timestamp()
           - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst)) THEN
        RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    credit := least(greatest(1, b.burst * b.messages_share), b.messages_credit
                    + greatest(0, extract(epoch FROM t - b.messages_refilled_at))
                      * b.rate * b.messages_share);
    reserve := least(have, b.messages_want, credit);
    IF reserve <= 0 THEN
        RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
        RETURN;
    END IF;
    -- v3 sees the bucket without the reserve; the reserve is put back after it took
    held := reserve;
    UPDATE rate_limits SET tokens = have - held, refilled_at = t, messages_credit = credit,
                           messages_refilled_at = t WHERE name = p_name;
    RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
    UPDATE rate_limits SET tokens = tokens + held WHERE name = p_name;
END
$$;

-- `pgcast rate messages-share F`: the share of the rate messages may take while broadcasts
-- wait. Returns the bucket's name and the share now.
CREATE FUNCTION pgcast_messages_share_v1(p_name text, p_share double precision)
RETURNS TABLE (name text, messages_share double precision)
LANGUAGE sql AS $$
    UPDATE rate_limits r SET messages_share = p_share, updated_at = now()
    WHERE r.name = p_name
    RETURNING r.name, r.messages_share
$$;

-- 0018_segments (issue 27): send to exactly the contacts a filter describes, fixed at send.
-- * A filter is JSON ({"tag": ...}, {"attribute": ..., "eq": ...}, {"all": [...]}, ...,
--   docs/segments.md). pgcast_segment_sql_v1 is its one compiler and validator: it turns a
--   filter into a predicate over `contacts c` whose every value (attribute names included)
--   is read from one bound jsonb parameter ($1); the SQL text is built from fixed fragments
--   and array positions only. The send, `segment count`, the API and a DBA all use it.
-- * pgcast_mailable: the one definition of a contact that may be mailed, for the snapshot
--   and every segment (LANGUAGE sql, inlined by the planner).
-- * segments: saved filters per account; {"segment": NAME} refers to one (expanded when a
--   filter is compiled, so a send evaluates the definitions of its moment).
-- * broadcasts.segment_filter: a draft's audience as given (a filter, or {"segment": NAME});
--   broadcasts.filter_used: the filter the send evaluated, saved segments expanded, frozen.
-- * pgcast_send_v6 (v5 with the filter) and pgcast_start_due_v3 (through v6; a filter that
--   no longer compiles, a saved segment deleted since, ends the broadcast failed with the
--   reason invalid_segment).

-- The one definition of "mailable" (not unsubscribed, not suppressed; an erased contact is
-- deleted). Unversioned on purpose: a new contact state (double opt-in) extends it with
-- CREATE OR REPLACE in its own migration, and every snapshot and segment follows.
-- LANGUAGE sql and one expression: the planner inlines it into the caller's WHERE.
CREATE FUNCTION pgcast_mailable(c contacts) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL $$;

-- A stored attribute as a number for gt/gte/lt/lte: a JSON number, or a string written as a
-- plain decimal number (a CSV column is stored as a string); NULL otherwise.
CREATE FUNCTION pgcast_segment_number_v1(v jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN jsonb_typeof(v) = 'number' THEN (v #>> '{}')::numeric
        WHEN jsonb_typeof(v) = 'string' AND (v #>> '{}') ~ '^-?[0-9]{1,30}(\.[0-9]{1,30})?$'
            THEN (v #>> '{}')::numeric
    END
$$;

CREATE TABLE segments (
    account    text        NOT NULL,
    name       text        NOT NULL,
    filter     jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, name),
    CONSTRAINT segments_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT segments_name_check CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')
);

ALTER TABLE broadcasts ADD COLUMN segment_filter jsonb;
ALTER TABLE broadcasts ADD COLUMN filter_used jsonb;
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_segment_one
    CHECK (segment_tag IS NULL OR segment_filter IS NULL);

-- Attribute conditions on eq/in (containment) and exists: GIN, so a selective condition is an
-- index scan; tags already have contacts_tags.
CREATE INDEX contacts_attributes ON contacts USING gin (attributes);

-- A filter error: the JSON path of what is wrong, then why (SQLSTATE PGS22, which the CLI
-- maps to exit 2 and the API to 422).
CREATE FUNCTION pgcast_segment_error_v1(p_path text, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PGS22', MESSAGE = p_path || ': ' || p_message;
END
$$;

-- One node of a filter: its predicate (over contacts c; values only as ($1->N)), the params
-- array grown with its values, the node count, and the node with saved segments expanded.
-- p_seen: the saved segments being expanded around this node (a cycle is refused).
-- Limits: depth 10 (saved segments count), 200 nodes, 100 items in a list, strings of 1000.
-- Adding an operator: one more WHEN below (and the docs' table).
CREATE FUNCTION pgcast_segment_node_v1(p_account text, p_filter jsonb, p_path text,
                                       p_depth integer, p_seen text[],
                                       INOUT params jsonb, INOUT nodes integer,
                                       OUT predicate text, OUT expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k text;
    op text;
    v jsonb;
    name jsonb;
    n integer;
    i integer;
    sub record;
    parts text[] := '{}';
    items jsonb := '[]';
    ref text;
    keys text[];
    stored jsonb;
    ops constant text[] := ARRAY['eq', 'ne', 'in', 'exists', 'prefix', 'gt', 'gte', 'lt',
                                 'lte'];
BEGIN
    IF p_depth > 10 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too deep: at most 10 levels of nesting');
    END IF;
    nodes := nodes + 1;
    IF nodes > 200 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too large: at most 200 conditions');
    END IF;
    IF jsonb_typeof(p_filter) IS DISTINCT FROM 'object' THEN
        PERFORM pgcast_segment_error_v1(p_path, 'a condition must be a JSON object');
    END IF;
    keys := ARRAY(SELECT jsonb_object_keys(p_filter) ORDER BY 1);
    IF p_filter ? 'attribute' THEN
        name := p_filter -> 'attribute';
        IF jsonb_typeof(name) IS DISTINCT FROM 'string'
                OR char_length(name #>> '{}') NOT BETWEEN 1 AND 64 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.attribute',
                                            'must be a name of 1 to 64 characters');
        END IF;
        SELECT array_agg(x) INTO keys FROM unnest(keys) x WHERE x <> 'attribute';
        IF coalesce(cardinality(keys), 0) <> 1 THEN
            PERFORM pgcast_segment_error_v1(p_path, 'an attribute condition has one operator ('
                                            || array_to_string(ops, ', ') || ')');
        END IF;
        op := keys[1];
        v := p_filter -> op;
        IF NOT op = ANY (ops) THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || op, 'unknown operator (one of '
                                            || array_to_string(ops, ', ') || ')');
        END IF;
        -- the name, as a bound value: ($1->>N) is the attribute's key
        params := params || jsonb_build_array(name);
        ref := format('($1->>%s)', jsonb_array_length(params) - 1);
        expanded := p_filter;
        CASE op
        WHEN 'eq', 'ne' THEN
            IF jsonb_typeof(v) IN ('object', 'array') THEN
                PERFORM pgcast_segment_error_v1(p_path || '.' || op,
                                                'must be a string, number, boolean or null');
            END IF;
            params := params || jsonb_build_array(jsonb_build_object(name #>> '{}', v));
            predicate := format('(c.attributes @> ($1->%s))', jsonb_array_length(params) - 1);
            IF op = 'ne' THEN
                predicate := '(NOT ' || predicate || ')';
            END IF;
        WHEN 'in' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'array' OR jsonb_array_length(v) NOT BETWEEN 1 AND 100
            THEN
                PERFORM pgcast_segment_error_v1(p_path || '.in',
                                                'must be a list of 1 to 100 values');
            END IF;
            FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
                IF jsonb_typeof(v -> i) IN ('object', 'array') THEN
                    PERFORM pgcast_segment_error_v1(format('%s.in[%s]', p_path, i),
                        'must be a string, number, boolean or null');
                END IF;
                params := params || jsonb_build_array(jsonb_build_object(name #>> '{}', v -> i));
                parts := parts || format('c.attributes @> ($1->%s)',
                                         jsonb_array_length(params) - 1);
            END LOOP;
            predicate := '(' || array_to_string(parts, ' OR ') || ')';
        WHEN 'exists' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'boolean' THEN
                PERFORM pgcast_segment_error_v1(p_path || '.exists', 'must be true or false');
            END IF;
            predicate := format('(c.attributes ? %s)', ref);
            IF v = 'false' THEN
                predicate := '(NOT ' || predicate || ')';
            END IF;
        WHEN 'prefix' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                    OR char_length(v #>> '{}') NOT BETWEEN 1 AND 1000 THEN
                PERFORM pgcast_segment_error_v1(p_path || '.prefix',
                                                'must be a string of 1 to 1000 characters');
            END IF;
            params := params || jsonb_build_array(v);
            predicate := format('coalesce(jsonb_typeof(c.attributes -> %s) = ''string'''
                                ' AND starts_with(c.attributes ->> %s, ($1->>%s)), false)',
                                ref, ref, jsonb_array_length(params) - 1);
        ELSE  -- gt, gte, lt, lte: numbers on both sides
            IF jsonb_typeof(v) IS DISTINCT FROM 'number' THEN
                PERFORM pgcast_segment_error_v1(p_path || '.' || op,
                    'must be a number (a numeric comparison needs numbers on both sides)');
            END IF;
            params := params || jsonb_build_array(v);
            predicate := format('coalesce(pgcast_segment_number_v1(c.attributes -> %s) %s'
                                ' ($1->>%s)::numeric, false)', ref,
                                CASE op WHEN 'gt' THEN '>' WHEN 'gte' THEN '>='
                                        WHEN 'lt' THEN '<' ELSE '<=' END,
                                jsonb_array_length(params) - 1);
        END CASE;
        RETURN;
    END IF;
    IF cardinality(keys) <> 1 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'a condition has exactly one key (or '
                                        '"attribute" and one operator)');
    END IF;
    k := keys[1];
    v := p_filter -> k;
    expanded := p_filter;
    CASE k
    WHEN 'all', 'any' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'array' OR jsonb_array_length(v) > 100 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'must be a list of at most 100 conditions');
        END IF;
        IF jsonb_array_length(v) = 0 THEN
            predicate := CASE k WHEN 'all' THEN 'true' ELSE 'false' END;
            RETURN;
        END IF;
        FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
            SELECT * INTO sub FROM pgcast_segment_node_v1(
                p_account, v -> i, format('%s.%s[%s]', p_path, k, i), p_depth + 1, p_seen,
                params, nodes);
            params := sub.params;
            nodes := sub.nodes;
            parts := parts || sub.predicate;
            items := items || jsonb_build_array(sub.expanded);
        END LOOP;
        predicate := '(' || array_to_string(parts, CASE k WHEN 'all' THEN ' AND ' ELSE ' OR ' END)
                     || ')';
        expanded := jsonb_build_object(k, items);
    WHEN 'not' THEN
        SELECT * INTO sub FROM pgcast_segment_node_v1(
            p_account, v, p_path || '.not', p_depth + 1, p_seen, params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := '(NOT ' || sub.predicate || ')';
        expanded := jsonb_build_object('not', sub.expanded);
    WHEN 'tag' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                OR char_length(v #>> '{}') NOT BETWEEN 1 AND 100 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.tag',
                                            'must be a tag of 1 to 100 characters');
        END IF;
        params := params || jsonb_build_array(v);
        predicate := format('(c.tags @> ARRAY[($1->>%s)])', jsonb_array_length(params) - 1);
    WHEN 'email_domain' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                OR char_length(v #>> '{}') NOT BETWEEN 1 AND 253 OR (v #>> '{}') LIKE '%@%' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.email_domain',
                                            'must be a domain (1 to 253 characters, no @)');
        END IF;
        params := params || jsonb_build_array(v);
        predicate := format('(lower(split_part(c.email, ''@'', -1)) = lower($1->>%s))',
                            jsonb_array_length(params) - 1);
    WHEN 'created_after', 'created_before' THEN
        -- a date (midnight UTC) or a date and time with an offset; stored normalised
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~
                '^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:?[0-9]{2}))?$'
        THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                'must be a date (2024-01-31) or an ISO 8601 time with an offset');
        END IF;
        BEGIN
            stored := to_jsonb(CASE WHEN char_length(v #>> '{}') = 10
                                    THEN ((v #>> '{}') || 'T00:00:00+00:00')::timestamptz
                                    ELSE (v #>> '{}')::timestamptz END);
        EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'not a valid date or time');
        END;
        params := params || jsonb_build_array(stored);
        -- an InitPlan: the text is cast once, not once per contact
        predicate := format('(c.created_at %s (SELECT ($1->>%s)::timestamptz))',
                            CASE k WHEN 'created_after' THEN '>' ELSE '<' END,
                            jsonb_array_length(params) - 1);
    WHEN 'received', 'delivered', 'bounced' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~*
                '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'must be a broadcast id');
        END IF;
        PERFORM 1 FROM broadcasts b WHERE b.id = (v #>> '{}')::uuid AND b.account = p_account;
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'no broadcast ' || (v #>> '{}') || ' in this account');
        END IF;
        params := params || jsonb_build_array(v);
        -- a semi-join over the broadcast's rows, live or archived (contact_id is never NULL,
        -- so IN is true or false, never NULL)
        predicate := format('(c.id IN (SELECT r.contact_id FROM broadcast_recipients_all r'
                            ' WHERE r.broadcast_id = ($1->>%s)::uuid AND %s))',
                            jsonb_array_length(params) - 1,
                            CASE k WHEN 'received' THEN 'r.status = ''sent'''
                                   WHEN 'delivered' THEN 'r.delivered_at IS NOT NULL'
                                   ELSE 'r.bounced_at IS NOT NULL' END);
    WHEN 'opened', 'clicked' THEN
        PERFORM pgcast_segment_error_v1(p_path || '.' || k,
            'not available yet: pgcast does not track opens and clicks');
    WHEN 'segment' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'must be a segment name');
        END IF;
        IF (v #>> '{}') = ANY (p_seen) THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'saved segment '
                || (v #>> '{}') || ' refers to itself (' || array_to_string(p_seen, ' -> ')
                || ' -> ' || (v #>> '{}') || ')');
        END IF;
        SELECT s.filter INTO stored FROM segments s
        WHERE s.account = p_account AND s.name = (v #>> '{}');
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment',
                                            'no saved segment ' || (v #>> '{}'));
        END IF;
        SELECT * INTO sub FROM pgcast_segment_node_v1(
            p_account, stored, p_path || '.segment(' || (v #>> '{}') || ')', p_depth + 1,
            p_seen || (v #>> '{}'), params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := sub.predicate;
        expanded := sub.expanded;
    ELSE
        PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'unknown condition (one of all, '
            'any, not, tag, attribute, email_domain, created_after, created_before, received, '
            'delivered, bounced, segment)');
    END CASE;
END
$$;

-- A filter compiled: the predicate over `contacts c` (values only from the bound $1), the
-- jsonb array to bind as $1, and the filter with saved segments expanded (what a send
-- freezes). Raises PGS22 naming the JSON path of anything unknown or invalid. p_seen: the
-- saved segments that must not be referred to (a segment being saved: itself).
CREATE FUNCTION pgcast_segment_sql_v1(p_account text, p_filter jsonb,
                                      p_seen text[] DEFAULT '{}')
RETURNS TABLE (predicate text, params jsonb, expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    IF p_filter IS NULL OR octet_length(p_filter::text) > 16384 THEN
        PERFORM pgcast_segment_error_v1('$', 'a filter is a JSON object of at most 16 KiB');
    END IF;
    SELECT * INTO r FROM pgcast_segment_node_v1(p_account, p_filter, '$', 1, p_seen,
                                                '[]'::jsonb, 0);
    RETURN QUERY SELECT r.predicate, r.params, r.expanded;
END
$$;

-- The mailable contacts of an account a filter selects (for DBAs, and the tests).
CREATE FUNCTION pgcast_segment_contacts_v1(p_account text, p_filter jsonb)
RETURNS SETOF contacts
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, p_filter);
    RETURN QUERY EXECUTE 'SELECT c.* FROM contacts c WHERE c.account = $2'
                         ' AND pgcast_mailable(c) AND ' || s.predicate
        USING s.params, p_account;
END
$$;

-- How many mailable contacts of an account a filter selects (`segment count`).
CREATE FUNCTION pgcast_segment_count_v1(p_account text, p_filter jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
    n bigint;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, p_filter);
    EXECUTE 'SELECT count(*) FROM contacts c WHERE c.account = $2'
            ' AND pgcast_mailable(c) AND ' || s.predicate
        INTO n USING s.params, p_account;
    RETURN n;
END
$$;

-- The filter a broadcast sends to: its segment_filter, else its tag, else every contact.
CREATE FUNCTION pgcast_broadcast_filter_v1(b broadcasts) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(b.segment_filter,
                    CASE WHEN b.segment_tag IS NOT NULL
                         THEN jsonb_build_object('tag', b.segment_tag) END,
                    '{"all": []}'::jsonb)
$$;

-- send, v6: v5 with the broadcast's filter (pgcast_broadcast_filter_v1) compiled and
-- evaluated in the snapshot's statement, in the send's transaction; the filter evaluated
-- (saved segments expanded) is frozen in filter_used and in the audit entry. A filter that
-- does not compile (a saved segment deleted since) raises PGS22 and changes nothing.
CREATE FUNCTION pgcast_send_v6(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
                               p_details jsonb DEFAULT '{}')
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
    s record;
BEGIN
    -- an acknowledged send is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status NOT IN ('draft', 'scheduled') THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, pgcast_broadcast_filter_v1(b));
    part := pgcast_partition_create_v3(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked) and contacts.id is
    -- unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $3, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND pgcast_mailable(c) AND %s', part, s.predicate)
        USING s.params, p_account, p_id;
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
        filter_used = s.expanded,
        started_at = now(),
        finished_at = CASE WHEN n = 0 THEN now() END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('send', u.status,
            CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('recipients', n, 'filter', s.expanded))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft', 'scheduled'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

-- start, v3: v2 through pgcast_send_v6. A filter that no longer compiles (a saved segment
-- deleted or changed since the broadcast was scheduled) ends the broadcast failed
-- (invalid_segment, the error in the audit entry) instead of failing every sweep.
CREATE FUNCTION pgcast_start_due_v3()
RETURNS TABLE (broadcast_id uuid, status text, queued integer, reason text,
               lateness_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    s record;
    late double precision;
    why text;
    started jsonb;
    c record;
    picked boolean := false;
BEGIN
    -- a start that failed is as durable as one that sent (send_v6 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the erasure lock before the broadcast row, as every path takes them (see v2)
    FOR c IN
        SELECT d.id, d.account FROM broadcasts d
        WHERE d.status = 'scheduled' AND d.scheduled_at <= now()
        ORDER BY d.scheduled_at
        LIMIT 10
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock_shared(hashtext('pgcast.erasure'),
                                                            hashtext(c.account));
        SELECT d.id, d.account, d.scheduled_at, d.not_after INTO b
        FROM broadcasts d
        WHERE d.id = c.id AND d.status = 'scheduled' AND d.scheduled_at <= now()
        FOR UPDATE SKIP LOCKED;
        picked := FOUND;
        EXIT WHEN picked;
    END LOOP;
    IF NOT picked THEN
        RETURN;
    END IF;
    late := round(extract(epoch FROM now() - b.scheduled_at), 3);
    started := jsonb_build_object('via', 'schedule', 'scheduled_at', b.scheduled_at,
                                  'not_after', b.not_after, 'started_at', now(),
                                  'lateness_seconds', late);
    IF b.not_after IS NOT NULL AND now() > b.not_after THEN
        why := 'missed_window';
    ELSE
        BEGIN
            SELECT * INTO s FROM pgcast_send_v6(b.account, b.id, false, started);
        EXCEPTION WHEN SQLSTATE 'PGS22' THEN
            why := 'invalid_segment';
            started := started || jsonb_build_object('error', SQLERRM);
        END;
        IF why IS NULL THEN  -- (s is unassigned when the send raised)
            IF s.ok THEN
                RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
                RETURN;
            END IF;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := coalesce(why, 'empty_segment');
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'failed', failed_reason = why, finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('start', u.status, 'failed',
            started || jsonb_build_object('reason', why))
    WHERE u.id = b.id AND u.status = ANY (ARRAY['scheduled'])
    RETURNING u.id, u.status, 0, why, late;
END
$$;

DROP FUNCTION pgcast_start_due_v2();
DROP FUNCTION pgcast_send_v5(text, uuid, boolean, jsonb);

-- 0019_subscribers (issue 28): the subscriber's side. Sign-up forms with double opt-in (a
-- contact can be unconfirmed), public topics for a preference centre, and a public archive.
--
-- A contact is mailable when it is confirmed, not unsubscribed, not suppressed and not erased
-- (deleted). pgcast_mailable says so in ONE place: the snapshot (pgcast_send_v6 and later), both
-- handoff paths (pgcast_handoff_v3, pgcast_claim_handoff_v5) and any later filter call it.
-- It is a LANGUAGE sql expression of the row, inlined by the planner: the snapshot's plan is
-- the same as with the columns spelled out.

-- NULL: signed up on a form and not confirmed yet. Existing contacts, imports and API adds
-- are confirmed (the default: the time they were written).
ALTER TABLE contacts ADD COLUMN confirmed_at timestamptz DEFAULT now();

-- The one definition, under the unversioned name branch segments (0018) gave it for its
-- filters; replaced (or created, without 0018) here with the confirmation, so every snapshot,
-- handoff and segment count follows. Same signature and attributes as 0018's.
CREATE OR REPLACE FUNCTION pgcast_mailable(c contacts) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT c.confirmed_at IS NOT NULL AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL $$;

-- why a contact is not mailable ('contact erased' when the row is gone), NULL when it is
CREATE FUNCTION pgcast_unmailable_reason_v1(c contacts)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN c.id IS NULL THEN 'contact erased'
                WHEN c.unsubscribed_at IS NOT NULL THEN 'unsubscribed'
                WHEN c.suppressed_at IS NOT NULL THEN 'suppressed: ' || c.suppressed_reason
                WHEN c.confirmed_at IS NULL THEN 'unconfirmed'
           END
$$;

-- the contacts fence covers the confirmation too: a confirm (or an unconfirm) commits before
-- or after a handoff, never in the middle of one
DROP TRIGGER contacts_fence_update ON contacts;
CREATE TRIGGER contacts_fence_update
    BEFORE UPDATE OF unsubscribed_at, suppressed_at, confirmed_at ON contacts
    FOR EACH ROW
    WHEN (OLD.unsubscribed_at IS DISTINCT FROM NEW.unsubscribed_at
          OR OLD.suppressed_at IS DISTINCT FROM NEW.suppressed_at
          OR OLD.confirmed_at IS DISTINCT FROM NEW.confirmed_at)
    EXECUTE FUNCTION pgcast_contact_fence_v1();

-- consent and preference changes are contact events too
ALTER TABLE contact_events DROP CONSTRAINT contact_events_action_check;
ALTER TABLE contact_events ADD CONSTRAINT contact_events_action_check
    CHECK (action IN ('unsubscribe', 'resubscribe', 'suppress', 'unsuppress', 'soft_bounce',
                      'erase', 'signup', 'confirm', 'preferences'));

-- A sign-up form: the tags a confirmed sign-up gets, the From of its confirmation mails,
-- whether it asks for confirmation, where
-- it sends the browser afterwards, and whether other sites may frame it.
CREATE TABLE forms (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account       text        NOT NULL CHECK (char_length(account) BETWEEN 1 AND 200),
    name          text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    tags          text[]      NOT NULL DEFAULT '{}',
    -- the From of the confirmation mails
    from_address  text        NOT NULL CHECK (char_length(from_address) BETWEEN 3 AND 998),
    double_opt_in boolean     NOT NULL DEFAULT true,
    redirect_url  text        CHECK (redirect_url ~ '^https?://' AND char_length(redirect_url) <= 2000),
    embeddable    boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account, name)
);

-- The tags of an account a person may choose on their preference page, with a label.
CREATE TABLE topics (
    account    text        NOT NULL CHECK (char_length(account) BETWEEN 1 AND 200),
    tag        text        NOT NULL CHECK (char_length(tag) BETWEEN 1 AND 100),
    label      text        NOT NULL CHECK (char_length(label) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, tag)
);

-- An account's public archive page (/a/{slug}): the sent broadcasts created with archive.
CREATE TABLE archives (
    account    text        PRIMARY KEY CHECK (char_length(account) BETWEEN 1 AND 200),
    slug       text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE broadcasts ADD COLUMN archive boolean NOT NULL DEFAULT false;

-- A sign-up on a form, one transaction: the erasure lock (shared) first, then the contact row
-- (created unconfirmed, or the existing one locked). Outcomes:
--   mail       a confirmation is due (new, unconfirmed or unsubscribed contact); the signup
--              event (details.mailed) counts toward p_max_mails per 24 hours
--   limited    as mail, but p_max_mails confirmations went out in the last 24 hours
--   tagged     already mailable: the form's tags are added, nothing is sent
--   subscribed a form without double opt-in: a new or unconfirmed contact is confirmed
--   ignored    erased, suppressed, or unsubscribed on a form without double opt-in
--   no_form    the form does not exist
-- Every outcome answers the person the same page: a form never tells who is on the list.
CREATE FUNCTION pgcast_signup_v1(p_form uuid, p_email text, p_name text, p_max_mails integer,
                                 p_details jsonb)
RETURNS TABLE (outcome text, contact_id bigint, account text, event_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    f forms%ROWTYPE;
    c contacts%ROWTYPE;
    mailed integer;
    ev bigint;
    details jsonb;
BEGIN
    SELECT * INTO f FROM forms WHERE id = p_form;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_form'::text, NULL::bigint, NULL::text, NULL::bigint;
        RETURN;
    END IF;
    details := coalesce(p_details, '{}') || jsonb_build_object('form', f.id, 'form_name', f.name);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(f.account));
    IF pgcast_erased_v1(f.account, p_email) THEN
        RETURN QUERY SELECT 'ignored'::text, NULL::bigint, f.account, NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO contacts AS k (account, email, name, tags, confirmed_at)
    VALUES (f.account, p_email, coalesce(p_name, ''),
            CASE WHEN f.double_opt_in THEN '{}' ELSE f.tags END,
            CASE WHEN f.double_opt_in THEN NULL ELSE clock_timestamp() END)
    ON CONFLICT (account, lower(email)) DO NOTHING
    RETURNING * INTO c;
    IF c.id IS NOT NULL AND NOT f.double_opt_in THEN
        INSERT INTO contact_events (account, contact_id, action, source, actor, details)
        VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                details || '{"confirmed": false, "double_opt_in": false}')
        RETURNING id INTO ev;
        RETURN QUERY SELECT 'subscribed'::text, c.id, f.account, ev;
        RETURN;
    END IF;
    IF c.id IS NULL THEN
        SELECT * INTO c FROM contacts k
        WHERE k.account = f.account AND lower(k.email) = lower(p_email) FOR UPDATE;
        IF NOT FOUND THEN  -- erased between the insert and the read: nothing to do
            RETURN QUERY SELECT 'ignored'::text, NULL::bigint, f.account, NULL::bigint;
            RETURN;
        END IF;
        IF c.suppressed_at IS NOT NULL
           OR (NOT f.double_opt_in AND c.unsubscribed_at IS NOT NULL) THEN
            RETURN QUERY SELECT 'ignored'::text, c.id, f.account, NULL::bigint;
            RETURN;
        END IF;
        IF pgcast_mailable(c) THEN
            UPDATE contacts k SET tags = k.tags || ARRAY(
                    SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
                updated_at = now()
            WHERE k.id = c.id;
            INSERT INTO contact_events (account, contact_id, action, source, actor, details)
            VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                    details || '{"already_subscribed": true}')
            RETURNING id INTO ev;
            RETURN QUERY SELECT 'tagged'::text, c.id, f.account, ev;
            RETURN;
        END IF;
        IF NOT f.double_opt_in THEN  -- unconfirmed, signing up on a form without opt-in
            UPDATE contacts k SET confirmed_at = clock_timestamp(), tags = k.tags || ARRAY(
                    SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
                updated_at = now()
            WHERE k.id = c.id;
            INSERT INTO contact_events (account, contact_id, action, source, actor, details)
            VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                    details || '{"confirmed": false, "double_opt_in": false}')
            RETURNING id INTO ev;
            RETURN QUERY SELECT 'subscribed'::text, c.id, f.account, ev;
            RETURN;
        END IF;
    END IF;
    -- double opt-in: a new, unconfirmed or unsubscribed contact gets a confirmation
    SELECT count(*) INTO mailed FROM contact_events e
    WHERE e.account = f.account AND e.contact_id = c.id AND e.action = 'signup'
      AND e.at > clock_timestamp() - interval '24 hours' AND e.details @> '{"mailed": true}';
    IF mailed >= p_max_mails THEN
        RETURN QUERY SELECT 'limited'::text, c.id, f.account, NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
            details || '{"mailed": true}')
    RETURNING id INTO ev;
    RETURN QUERY SELECT 'mail'::text, c.id, f.account, ev;
END
$$;

-- One POST /f/{id} in one statement: pgcast_signup_v1 and, when a confirmation is due,
-- pgcast_send_confirmation_v1 with the mail the caller composed (its link names the address
-- and the form, so it is made before the contact's id is known), from the form's From, keyed
-- by the signup event. With what the answer needs: the form's double_opt_in, redirect_url
-- and embeddable. No row when the form does not exist.
CREATE FUNCTION pgcast_form_signup_v1(p_form uuid, p_email text, p_name text,
                                      p_max_mails integer, p_details jsonb, p_subject text,
                                      p_text text, p_html text)
RETURNS TABLE (outcome text, message_id uuid, double_opt_in boolean, redirect_url text,
               embeddable boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    f forms%ROWTYPE;
    mid uuid;
BEGIN
    -- held until commit: a form deleted meanwhile waits (its From is read once, here)
    SELECT * INTO f FROM forms WHERE id = p_form FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_signup_v1(p_form, p_email, p_name, p_max_mails, p_details);
    IF s.outcome = 'mail' THEN
        mid := pgcast_send_confirmation_v1(s.account, p_email, p_subject, p_text, p_html,
                                           f.from_address, 'confirmation:' || s.event_id);
    END IF;
    RETURN QUERY SELECT s.outcome, mid, f.double_opt_in, f.redirect_url, f.embeddable;
END
$$;

-- Confirm a sign-up (POST /f/confirm/{token}): the contact becomes confirmed and subscribed
-- with the form's tags, and contact_events records the consent (form, time, confirmed). An
-- unsubscribe later than the token (p_issued) is not undone by an old link. ok = false when
-- the contact or the form is gone, the contact is suppressed, or it unsubscribed since.
CREATE FUNCTION pgcast_confirm_v1(p_email text, p_form uuid, p_issued timestamptz,
                                  p_details jsonb)
RETURNS TABLE (ok boolean, account text, redirect_url text)
LANGUAGE plpgsql AS $$
DECLARE
    f forms%ROWTYPE;
    c contacts%ROWTYPE;
BEGIN
    SELECT * INTO f FROM forms WHERE id = p_form;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO c FROM contacts k
    WHERE k.account = f.account AND lower(k.email) = lower(p_email) FOR UPDATE;
    IF NOT FOUND OR c.suppressed_at IS NOT NULL OR c.unsubscribed_at > p_issued THEN
        RETURN QUERY SELECT false, f.account, f.redirect_url;
        RETURN;
    END IF;
    IF pgcast_mailable(c) AND c.tags @> f.tags THEN  -- confirmed already (a second click)
        RETURN QUERY SELECT true, f.account, f.redirect_url;
        RETURN;
    END IF;
    UPDATE contacts k
    SET confirmed_at = coalesce(k.confirmed_at, clock_timestamp()), unsubscribed_at = NULL,
        tags = k.tags || ARRAY(SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
        updated_at = now()
    WHERE k.id = c.id;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (f.account, c.id, 'confirm', 'form', '{"via": "form"}',
            coalesce(p_details, '{}') || jsonb_build_object(
                'form', f.id, 'form_name', f.name, 'confirmed', true, 'tags', f.tags,
                'resubscribed', c.unsubscribed_at IS NOT NULL, 'link_issued_at', p_issued));
    RETURN QUERY SELECT true, f.account, f.redirect_url;
END
$$;

-- Save a person's preference page: their tags among the account's topics become exactly
-- p_chosen (other tags are kept); one preferences event with what was added and removed.
CREATE FUNCTION pgcast_preferences_v1(p_contact bigint, p_chosen text[], p_broadcast uuid)
RETURNS TABLE (ok boolean, added text[], removed text[])
LANGUAGE plpgsql AS $$
DECLARE
    c contacts%ROWTYPE;
    offered text[];
    wanted text[];
    plus text[];
    minus text[];
BEGIN
    SELECT * INTO c FROM contacts k WHERE k.id = p_contact FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::text[], NULL::text[];
        RETURN;
    END IF;
    offered := ARRAY(SELECT t.tag FROM topics t WHERE t.account = c.account ORDER BY t.tag);
    wanted := ARRAY(SELECT x FROM unnest(p_chosen) x WHERE x = ANY (offered));
    plus := ARRAY(SELECT x FROM unnest(wanted) x WHERE NOT x = ANY (c.tags));
    minus := ARRAY(SELECT x FROM unnest(c.tags) x WHERE x = ANY (offered) AND NOT x = ANY (wanted));
    IF cardinality(plus) + cardinality(minus) > 0 THEN
        UPDATE contacts k
        SET tags = ARRAY(SELECT x FROM unnest(k.tags) x WHERE NOT x = ANY (minus)) || plus,
            updated_at = now()
        WHERE k.id = c.id;
        INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id,
                                    details)
        VALUES (c.account, c.id, 'preferences', 'preferences', '{"via": "preferences"}',
                p_broadcast, jsonb_build_object('added', plus, 'removed', minus));
    END IF;
    RETURN QUERY SELECT true, plus, minus;
END
$$;


-- handoff, v3: v2 with the contact read through pgcast_mailable (an unconfirmed contact
-- is skipped, 'unconfirmed') and the reason from pgcast_unmailable_reason_v1.
CREATE FUNCTION pgcast_handoff_v3(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[])
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
    -- the contacts fence (exclusive in every writer of the columns the predicate reads)
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    gone := ARRAY(
        SELECT x.id FROM unnest(p_ids) AS x(id) LEFT JOIN contacts k ON k.id = x.id
        WHERE k.id IS NULL OR NOT pgcast_mailable(k));
    IF cardinality(gone) > 0 THEN
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    locked := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND l.lease_expires_at > clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(gone) > 0 THEN
        UPDATE broadcast_recipients r
        SET status = 'skipped', lease_expires_at = NULL,
            last_error = coalesce((SELECT pgcast_unmailable_reason_v1(k) FROM contacts k
                                   WHERE k.id = r.contact_id), 'contact erased')
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
    RETURNING r.contact_id, r.email, c.name, c.attributes, c.tags;
END
$$;

-- claim and hand off, v5: v4 with the contact read through pgcast_mailable.
CREATE FUNCTION pgcast_claim_handoff_v5(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint,
               global_rate double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
    lim double precision;
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
    lim := coalesce((SELECT l.rate FROM rate_limits l WHERE l.name = 'global'), 0);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable AND lim = 0 THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable AND lim = 0 THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name,
                 coalesce(ct.attributes, '{}') AS attributes, coalesce(ct.tags, '{}') AS tags,
                 ct.id IS NOT NULL AND pgcast_mailable(ct) AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e,
              k.mailable AND lim = 0, c.last_fresh, lim;
END
$$;


-- The confirmation of a sign-up, sent on the transactional messages path (0017: category
-- confirmation, ahead of broadcasts) in the caller's transaction. One function, so that the
-- path is named in one place; returns the message's id (the same id for the same key).
CREATE FUNCTION pgcast_send_confirmation_v1(p_account text, p_to text, p_subject text,
                                            p_text text, p_html text, p_from text,
                                            p_idempotency_key text)
RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgcast_send_message(p_account, p_to, p_subject, p_text, p_html, p_from,
                               p_idempotency_key, 'confirmation');
END
$$;

-- 0020_tracking (issue 29): opens and clicks, per broadcast, with privacy by design.
-- * broadcasts.track: 'none' (nothing is recorded, no link is rewritten), 'aggregate'
--   (counts only: no event row names a contact) or 'contact' (per-person events). Chosen
--   at create: the broadcast's own choice, else its account's default set by the operator
--   (tracking_defaults, `pgcast tracking default`), else 'none'.
-- * broadcast_links: a broadcast's tracked links, stored once, by the first worker that
--   loads its content (pgcast_links_store_v1: every worker then reads the same table, so a
--   link's index is the same in every message whichever worker rendered it).
-- * tracking_events: one row per open or click, partitioned by month (partitions made on
--   demand by pgcast_tracking_partition_v1); contact_id only in 'contact' mode, enforced
--   here (pgcast_track_v1 drops it for any other mode). No IP address, no user agent.
-- * tracking_counts: the report's rollup (per broadcast, kind, link and hour), kept in the
--   transaction that writes the events: a report reads a few hundred rows, never the events.
-- * tracking_firsts: a contact's first human open / click (any link, and each link) of a
--   broadcast ('contact' mode only): unique counts, and the activity segments.
-- Retention drops whole months of events older than its cutoff and the firsts of archived
-- broadcasts; contacts erase (pgcast_erase_v5) deletes the contact's events and firsts.

CREATE TABLE tracking_defaults (
    account    text        PRIMARY KEY CHECK (char_length(account) BETWEEN 1 AND 200),
    mode       text        NOT NULL CHECK (mode IN ('none', 'aggregate', 'contact')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE broadcasts ADD COLUMN track text NOT NULL DEFAULT 'none'
    CHECK (track IN ('none', 'aggregate', 'contact'));

CREATE TABLE broadcast_links (
    broadcast_id uuid     NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    idx          smallint NOT NULL CHECK (idx >= 0),
    -- exactly what the template's href said, character references decoded as HTML does
    url          text     NOT NULL CHECK (octet_length(url) <= 2048),
    PRIMARY KEY (broadcast_id, idx),
    UNIQUE (broadcast_id, url)
);

CREATE TABLE tracking_events (
    at           timestamptz NOT NULL,
    broadcast_id uuid        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    CHECK ((kind = 'click') = (link IS NOT NULL)),
    contact_id   bigint,  -- 'contact' mode only
    machine      boolean     NOT NULL,
    source       text        NOT NULL CHECK (source IN ('pgcast', 'ses'))
) PARTITION BY RANGE (at);
CREATE INDEX tracking_events_broadcast ON tracking_events (broadcast_id, at);
CREATE INDEX tracking_events_contact ON tracking_events (contact_id)
    WHERE contact_id IS NOT NULL;

CREATE TABLE tracking_counts (
    broadcast_id uuid        NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    NOT NULL,  -- -1: an open, or (uniq only) a click on any link
    hour         timestamptz NOT NULL,
    total        bigint      NOT NULL DEFAULT 0,
    machine      bigint      NOT NULL DEFAULT 0,
    uniq         bigint      NOT NULL DEFAULT 0,  -- contacts whose first human event this is
    PRIMARY KEY (broadcast_id, kind, link, hour)
);

CREATE TABLE tracking_firsts (
    broadcast_id uuid        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    NOT NULL,  -- -1: an open, or a click on any link
    contact_id   bigint      NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (broadcast_id, kind, link, contact_id)
);
CREATE INDEX tracking_firsts_contact ON tracking_firsts (contact_id);

-- the report's unsubscribes of one broadcast (contact_events.broadcast_id)
CREATE INDEX contact_events_broadcast ON contact_events (broadcast_id)
    WHERE broadcast_id IS NOT NULL;

-- the partition of tracking_events that holds p_at's month (UTC), made when missing; made
-- under an advisory lock (two sessions never race to create the same table)
CREATE FUNCTION pgcast_tracking_partition_v1(p_at timestamptz)
RETURNS regclass LANGUAGE plpgsql AS $$
DECLARE
    m timestamp := date_trunc('month', p_at AT TIME ZONE 'UTC');
    name text := 'tracking_events_' || to_char(m, 'YYYYMM');
    found regclass;
BEGIN
    found := to_regclass(quote_ident(current_schema()) || '.' || name);
    IF found IS NOT NULL THEN
        RETURN found;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.tracking_partition'), 0);
    found := to_regclass(quote_ident(current_schema()) || '.' || name);
    IF found IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF tracking_events '
                       'FOR VALUES FROM (%L) TO (%L)', current_schema(), name,
                       m AT TIME ZONE 'UTC', (m + interval '1 month') AT TIME ZONE 'UTC');
        found := to_regclass(quote_ident(current_schema()) || '.' || name);
    END IF;
    RETURN found;
END
$$;

-- a broadcast's tracked links: the first caller stores p_urls (index = position - 1), every
-- caller gets the stored table back. Two workers at once: the second waits on the first's
-- keys and stores nothing; workers whose lists differ (a mixed upgrade) still agree, since
-- everyone uses what is stored.
CREATE FUNCTION pgcast_links_store_v1(p_id uuid, p_urls text[])
RETURNS TABLE (idx smallint, url text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO broadcast_links (broadcast_id, idx, url)
    SELECT p_id, (u.i - 1)::smallint, u.url
    FROM unnest(p_urls) WITH ORDINALITY AS u(url, i)
    WHERE NOT EXISTS (SELECT 1 FROM broadcast_links l WHERE l.broadcast_id = p_id)
    ORDER BY u.i
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT l.idx, l.url FROM broadcast_links l
                 WHERE l.broadcast_id = p_id ORDER BY l.idx;
END
$$;

-- record a batch of opens and clicks (the API's buffer, or SES events). Events commit
-- asynchronously (a crash loses at most the last moments' counts, never a redirect).
-- Lock order: the contacts named (FOR KEY SHARE, by id: an erase holding one FOR UPDATE is
-- waited for, and its deleted row then drops the event), then firsts, then rollup rows in
-- key order. A contact id is kept only for a 'contact' broadcast; events of a 'none'
-- broadcast, or of no broadcast, are dropped. Returns the events written.
CREATE FUNCTION pgcast_track_v1(p_broadcasts uuid[], p_at timestamptz[], p_kinds text[],
                                p_links smallint[], p_contacts bigint[], p_machine boolean[],
                                p_source text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    alive bigint[];
    month timestamptz;
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR month IN SELECT DISTINCT date_trunc('month', a AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                 FROM unnest(p_at) AS a LOOP
        PERFORM pgcast_tracking_partition_v1(month);
    END LOOP;
    alive := ARRAY(SELECT c.id FROM contacts c
                   WHERE c.id = ANY (p_contacts) ORDER BY c.id FOR KEY SHARE);
    WITH batch AS (
        SELECT e.at, e.b AS broadcast_id, e.kind,
               CASE WHEN e.kind = 'click' THEN e.link END AS link,
               CASE WHEN b.track = 'contact' THEN e.contact END AS contact_id, e.machine
        FROM unnest(p_broadcasts, p_at, p_kinds, p_links, p_contacts, p_machine)
             AS e(b, at, kind, link, contact, machine)
        JOIN broadcasts b ON b.id = e.b AND b.track <> 'none'
        WHERE e.contact IS NULL OR b.track <> 'contact' OR e.contact = ANY (alive)
    ), written AS (
        INSERT INTO tracking_events (at, broadcast_id, kind, link, contact_id, machine, source)
        SELECT t.at, t.broadcast_id, t.kind, t.link, t.contact_id, t.machine, p_source
        FROM batch t
        RETURNING 1
    ), wanted AS (
        SELECT t.broadcast_id, t.kind, coalesce(t.link, -1)::smallint AS link, t.contact_id,
               min(t.at) AS at
        FROM batch t
        WHERE t.contact_id IS NOT NULL AND NOT t.machine
        GROUP BY 1, 2, 3, 4
        UNION ALL  -- a click on any link
        SELECT t.broadcast_id, t.kind, -1::smallint, t.contact_id, min(t.at)
        FROM batch t
        WHERE t.contact_id IS NOT NULL AND NOT t.machine AND t.kind = 'click'
        GROUP BY 1, 2, 3, 4
    ), firsts AS (
        INSERT INTO tracking_firsts (broadcast_id, kind, link, contact_id, at)
        SELECT w.broadcast_id, w.kind, w.link, w.contact_id, w.at FROM wanted w
        ORDER BY w.broadcast_id, w.kind, w.link, w.contact_id
        ON CONFLICT DO NOTHING
        RETURNING broadcast_id, kind, link, at
    ), counted AS (
        SELECT t.broadcast_id, t.kind, coalesce(t.link, -1)::smallint AS link,
               date_trunc('hour', t.at) AS hour, count(*) AS total,
               count(*) FILTER (WHERE t.machine) AS machine, 0::bigint AS uniq
        FROM batch t GROUP BY 1, 2, 3, 4
        UNION ALL
        SELECT f.broadcast_id, f.kind, f.link, date_trunc('hour', f.at), 0, 0, count(*)
        FROM firsts f GROUP BY 1, 2, 3, 4
    ), summed AS (
        SELECT c.broadcast_id, c.kind, c.link, c.hour, sum(c.total)::bigint AS total,
               sum(c.machine)::bigint AS machine, sum(c.uniq)::bigint AS uniq
        FROM counted c GROUP BY 1, 2, 3, 4
    ), rolled AS (
        INSERT INTO tracking_counts AS k (broadcast_id, kind, link, hour, total, machine, uniq)
        SELECT s.broadcast_id, s.kind, s.link, s.hour, s.total, s.machine, s.uniq
        FROM summed s
        ORDER BY s.broadcast_id, s.kind, s.link, s.hour
        ON CONFLICT (broadcast_id, kind, link, hour) DO UPDATE
        SET total = k.total + EXCLUDED.total, machine = k.machine + EXCLUDED.machine,
            uniq = k.uniq + EXCLUDED.uniq
        RETURNING 1
    )
    SELECT count(*) INTO n FROM written;
    RETURN n;
END
$$;

-- erase, v5: v4 (v3 and the account's messages, 0017), then the contact's opens and clicks
-- (events and firsts) in the account's broadcasts, under v3's locks (the erasure lock, the
-- contact row). The rollup's counts stay: they name nobody.
CREATE FUNCTION pgcast_erase_v5(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM pgcast_erase_v4(p_account, p_email, p_source, p_actor);
    IF r.contact_id IS NOT NULL THEN
        DELETE FROM tracking_events e
        WHERE e.contact_id = r.contact_id
          AND e.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
        DELETE FROM tracking_firsts f
        WHERE f.contact_id = r.contact_id
          AND f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
    END IF;
    RETURN QUERY SELECT r.contact_id, r.recipients, r.messages;
END
$$;

-- retention: drop the months of events that ended before p_before, and the firsts of
-- archived broadcasts (their recipients have left the live tables too). Returns the
-- partitions dropped.
CREATE FUNCTION pgcast_tracking_retention_v1(p_before timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    p record;
    n integer := 0;
BEGIN
    FOR p IN
        SELECT c.oid::regclass AS part,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                             'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tracking_events'::regclass
        ORDER BY 2
    LOOP
        CONTINUE WHEN p.upper IS NULL OR p.upper > p_before;
        EXECUTE format('DROP TABLE %s', p.part);
        n := n + 1;
    END LOOP;
    DELETE FROM tracking_firsts f
    WHERE f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.archived_at IS NOT NULL);
    RETURN n;
END
$$;


-- Segments by activity (issue 29 with issue 27's compiler): {"opened": BROADCAST_ID} and
-- {"clicked": BROADCAST_ID} select the contacts with a human open / click of that broadcast
-- (tracking_firsts), for a broadcast that tracked in 'contact' mode; any other broadcast is
-- refused with the reason. pgcast_segment_node_v2 handles these two and the conditions that
-- hold conditions (all, any, not, segment: so they may nest anywhere), and hands every other
-- leaf to pgcast_segment_node_v1 unchanged. Callers switch to sql_v2, count_v2, contacts_v2,
-- send_v7 and start_due_v4; the v1 functions are kept (node_v1 is used by v2).
CREATE FUNCTION pgcast_segment_node_v2(p_account text, p_filter jsonb, p_path text,
                                       p_depth integer, p_seen text[],
                                       INOUT params jsonb, INOUT nodes integer,
                                       OUT predicate text, OUT expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k text;
    v jsonb;
    i integer;
    sub record;
    parts text[] := '{}';
    items jsonb := '[]';
    stored jsonb;
    mode text;
BEGIN
    IF jsonb_typeof(p_filter) IS DISTINCT FROM 'object' OR p_filter ? 'attribute'
            OR (SELECT count(*) FROM jsonb_object_keys(p_filter)) <> 1 THEN
        SELECT * INTO sub FROM pgcast_segment_node_v1(p_account, p_filter, p_path, p_depth,
                                                      p_seen, params, nodes);
        params := sub.params; nodes := sub.nodes;
        predicate := sub.predicate; expanded := sub.expanded;
        RETURN;
    END IF;
    k := (SELECT jsonb_object_keys(p_filter) LIMIT 1);
    v := p_filter -> k;
    IF k NOT IN ('all', 'any', 'not', 'segment', 'opened', 'clicked') THEN
        SELECT * INTO sub FROM pgcast_segment_node_v1(p_account, p_filter, p_path, p_depth,
                                                      p_seen, params, nodes);
        params := sub.params; nodes := sub.nodes;
        predicate := sub.predicate; expanded := sub.expanded;
        RETURN;
    END IF;
    -- the limits node_v1 checks for every node
    IF p_depth > 10 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too deep: at most 10 levels of nesting');
    END IF;
    nodes := nodes + 1;
    IF nodes > 200 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too large: at most 200 conditions');
    END IF;
    expanded := p_filter;
    CASE k
    WHEN 'all', 'any' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'array' OR jsonb_array_length(v) > 100 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'must be a list of at most 100 conditions');
        END IF;
        IF jsonb_array_length(v) = 0 THEN
            predicate := CASE k WHEN 'all' THEN 'true' ELSE 'false' END;
            RETURN;
        END IF;
        FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
            SELECT * INTO sub FROM pgcast_segment_node_v2(
                p_account, v -> i, format('%s.%s[%s]', p_path, k, i), p_depth + 1, p_seen,
                params, nodes);
            params := sub.params;
            nodes := sub.nodes;
            parts := parts || sub.predicate;
            items := items || jsonb_build_array(sub.expanded);
        END LOOP;
        predicate := '(' || array_to_string(parts, CASE k WHEN 'all' THEN ' AND ' ELSE ' OR ' END)
                     || ')';
        expanded := jsonb_build_object(k, items);
    WHEN 'not' THEN
        SELECT * INTO sub FROM pgcast_segment_node_v2(
            p_account, v, p_path || '.not', p_depth + 1, p_seen, params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := '(NOT ' || sub.predicate || ')';
        expanded := jsonb_build_object('not', sub.expanded);
    WHEN 'segment' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'must be a segment name');
        END IF;
        IF (v #>> '{}') = ANY (p_seen) THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'saved segment '
                || (v #>> '{}') || ' refers to itself (' || array_to_string(p_seen, ' -> ')
                || ' -> ' || (v #>> '{}') || ')');
        END IF;
        SELECT s.filter INTO stored FROM segments s
        WHERE s.account = p_account AND s.name = (v #>> '{}');
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment',
                                            'no saved segment ' || (v #>> '{}'));
        END IF;
        SELECT * INTO sub FROM pgcast_segment_node_v2(
            p_account, stored, p_path || '.segment(' || (v #>> '{}') || ')', p_depth + 1,
            p_seen || (v #>> '{}'), params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := sub.predicate;
        expanded := sub.expanded;
    ELSE  -- opened, clicked
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~*
                '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'must be a broadcast id');
        END IF;
        SELECT b.track INTO mode FROM broadcasts b
        WHERE b.id = (v #>> '{}')::uuid AND b.account = p_account;
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'no broadcast ' || (v #>> '{}') || ' in this account');
        END IF;
        IF mode IS DISTINCT FROM 'contact' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                'broadcast ' || (v #>> '{}') || ' did not track opens and clicks per contact '
                || '(its tracking mode is ' || coalesce(mode, 'none') || '; only a broadcast '
                || 'sent with --track contact can be a segment by activity)');
        END IF;
        params := params || jsonb_build_array(v);
        -- a semi-join over the broadcast's firsts (contact_id is never NULL)
        predicate := format('(c.id IN (SELECT f.contact_id FROM tracking_firsts f'
                            ' WHERE f.broadcast_id = ($1->>%s)::uuid AND f.kind = %L'
                            ' AND f.link = -1))', jsonb_array_length(params) - 1,
                            CASE k WHEN 'opened' THEN 'open' ELSE 'click' END);
    END CASE;
END
$$;

-- A filter compiled (v2: v1 with the activity conditions, through pgcast_segment_node_v2): the predicate over `contacts c` (values only from the bound $1), the
-- jsonb array to bind as $1, and the filter with saved segments expanded (what a send
-- freezes). Raises PGS22 naming the JSON path of anything unknown or invalid. p_seen: the
-- saved segments that must not be referred to (a segment being saved: itself).
CREATE FUNCTION pgcast_segment_sql_v2(p_account text, p_filter jsonb,
                                      p_seen text[] DEFAULT '{}')
RETURNS TABLE (predicate text, params jsonb, expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    IF p_filter IS NULL OR octet_length(p_filter::text) > 16384 THEN
        PERFORM pgcast_segment_error_v1('$', 'a filter is a JSON object of at most 16 KiB');
    END IF;
    SELECT * INTO r FROM pgcast_segment_node_v2(p_account, p_filter, '$', 1, p_seen,
                                                '[]'::jsonb, 0);
    RETURN QUERY SELECT r.predicate, r.params, r.expanded;
END
$$;

-- v2: through pgcast_segment_sql_v2. The mailable contacts of an account a filter selects (for DBAs, and the tests).
CREATE FUNCTION pgcast_segment_contacts_v2(p_account text, p_filter jsonb)
RETURNS SETOF contacts
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, p_filter);
    RETURN QUERY EXECUTE 'SELECT c.* FROM contacts c WHERE c.account = $2'
                         ' AND pgcast_mailable(c) AND ' || s.predicate
        USING s.params, p_account;
END
$$;

-- v2: through pgcast_segment_sql_v2. How many mailable contacts of an account a filter selects (`segment count`).
CREATE FUNCTION pgcast_segment_count_v2(p_account text, p_filter jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
    n bigint;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, p_filter);
    EXECUTE 'SELECT count(*) FROM contacts c WHERE c.account = $2'
            ' AND pgcast_mailable(c) AND ' || s.predicate
        INTO n USING s.params, p_account;
    RETURN n;
END
$$;

-- send, v7: v6 with the filter compiled by pgcast_segment_sql_v2 (activity conditions).
CREATE FUNCTION pgcast_send_v7(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
                               p_details jsonb DEFAULT '{}')
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
    s record;
BEGIN
    -- an acknowledged send is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status NOT IN ('draft', 'scheduled') THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, pgcast_broadcast_filter_v1(b));
    part := pgcast_partition_create_v3(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked) and contacts.id is
    -- unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $3, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND pgcast_mailable(c) AND %s', part, s.predicate)
        USING s.params, p_account, p_id;
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
        filter_used = s.expanded,
        started_at = now(),
        finished_at = CASE WHEN n = 0 THEN now() END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('send', u.status,
            CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('recipients', n, 'filter', s.expanded))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft', 'scheduled'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

-- start, v4: v3 through pgcast_send_v7.
CREATE FUNCTION pgcast_start_due_v4()
RETURNS TABLE (broadcast_id uuid, status text, queued integer, reason text,
               lateness_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    s record;
    late double precision;
    why text;
    started jsonb;
    c record;
    picked boolean := false;
BEGIN
    -- a start that failed is as durable as one that sent (send_v7 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the erasure lock before the broadcast row, as every path takes them (see v2)
    FOR c IN
        SELECT d.id, d.account FROM broadcasts d
        WHERE d.status = 'scheduled' AND d.scheduled_at <= now()
        ORDER BY d.scheduled_at
        LIMIT 10
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock_shared(hashtext('pgcast.erasure'),
                                                            hashtext(c.account));
        SELECT d.id, d.account, d.scheduled_at, d.not_after INTO b
        FROM broadcasts d
        WHERE d.id = c.id AND d.status = 'scheduled' AND d.scheduled_at <= now()
        FOR UPDATE SKIP LOCKED;
        picked := FOUND;
        EXIT WHEN picked;
    END LOOP;
    IF NOT picked THEN
        RETURN;
    END IF;
    late := round(extract(epoch FROM now() - b.scheduled_at), 3);
    started := jsonb_build_object('via', 'schedule', 'scheduled_at', b.scheduled_at,
                                  'not_after', b.not_after, 'started_at', now(),
                                  'lateness_seconds', late);
    IF b.not_after IS NOT NULL AND now() > b.not_after THEN
        why := 'missed_window';
    ELSE
        BEGIN
            SELECT * INTO s FROM pgcast_send_v7(b.account, b.id, false, started);
        EXCEPTION WHEN SQLSTATE 'PGS22' THEN
            why := 'invalid_segment';
            started := started || jsonb_build_object('error', SQLERRM);
        END;
        IF why IS NULL THEN  -- (s is unassigned when the send raised)
            IF s.ok THEN
                RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
                RETURN;
            END IF;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := coalesce(why, 'empty_segment');
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'failed', failed_reason = why, finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('start', u.status, 'failed',
            started || jsonb_build_object('reason', why))
    WHERE u.id = b.id AND u.status = ANY (ARRAY['scheduled'])
    RETURNING u.id, u.status, 0, why, late;
END
$$;

-- 0021_webhooks: events out (issue 30). An event is written by the transaction that makes the
-- change it reports (a trigger on the change, or pgcast_emit_event_v1 called by the function
-- that makes it), so a change that rolls back leaves no event, and a committed change always
-- has its event. Workers deliver each event to every endpoint of the account that asked for
-- its type: signed POSTs, at least once, in order per endpoint.

-- An application's receiver. The secret signs every delivery, so it is stored as it is (the
-- worker needs it to sign): whoever can read this table can sign as pgcast. events: the types
-- it wants, or '*' for all. A disabled endpoint gets no new events and is not delivered to.
CREATE TABLE webhook_endpoints (
    id                uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account           text        NOT NULL,
    url               text        NOT NULL,
    events            text[]      NOT NULL CHECK (cardinality(events) > 0),
    secret            text        NOT NULL,
    enabled           boolean     NOT NULL DEFAULT true,
    disabled_at       timestamptz,
    disabled_reason   text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    secret_rotated_at timestamptz,
    audit_log         jsonb       NOT NULL DEFAULT '[]',
    -- the worker delivering to it now (one at a time: deliveries keep their order)
    lease_token       uuid,
    lease_expires_at  timestamptz,
    worker            text,
    CONSTRAINT webhook_endpoints_disabled_check CHECK (enabled = (disabled_at IS NULL))
);
CREATE INDEX webhook_endpoints_account ON webhook_endpoints (account) WHERE enabled;

-- The outbox: one row per event, whatever the number of endpoints. contact_id: the contact
-- an event names (an erase scrubs its address from the events that hold it).
CREATE TABLE webhook_events (
    id         uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account    text        NOT NULL,
    type       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    data       jsonb       NOT NULL,
    contact_id bigint
);
CREATE INDEX webhook_events_contact ON webhook_events (account, contact_id)
    WHERE contact_id IS NOT NULL;
-- what the prune reads first: the oldest events
CREATE INDEX webhook_events_created ON webhook_events (created_at);

-- One event to one endpoint. Delivered in id order per endpoint (the head blocks the rest
-- while it is retried); response: the first 1 KiB of the receiver's answer.
CREATE TABLE webhook_deliveries (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id     uuid        NOT NULL REFERENCES webhook_endpoints ON DELETE CASCADE,
    event_id        uuid        NOT NULL REFERENCES webhook_events ON DELETE CASCADE,
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    next_attempt_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the first attempt: retries give up p_give_up after it (not after the event was
    -- queued: an event behind a retried head waits without spending its own time)
    first_attempt_at timestamptz,
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    latency_ms      double precision,
    response        text,
    delivered_at    timestamptz
);
CREATE INDEX webhook_deliveries_pending ON webhook_deliveries (endpoint_id, id)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id DESC);
CREATE INDEX webhook_deliveries_event ON webhook_deliveries (event_id);

-- emit: one event of an account, fanned out to the endpoints that want its type, in the
-- caller's transaction. The endpoints are locked FOR KEY SHARE (an endpoint deleted meanwhile
-- is skipped, never an error in the caller's change; a claim's NO KEY UPDATE does not wait).
-- Returns the event's id, or NULL when no endpoint wants it (nothing is stored).
CREATE FUNCTION pgcast_emit_event_v1(p_account text, p_type text, p_data jsonb,
                                     p_contact bigint DEFAULT NULL)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    ev uuid;
    targets uuid[];
BEGIN
    targets := ARRAY(SELECT e.id FROM webhook_endpoints e
                     WHERE e.account = p_account AND e.enabled
                       AND (p_type = ANY (e.events) OR '*' = ANY (e.events))
                     ORDER BY e.id FOR KEY SHARE);
    IF cardinality(targets) = 0 THEN
        RETURN NULL;
    END IF;
    INSERT INTO webhook_events (account, type, data, contact_id)
    VALUES (p_account, p_type, p_data, p_contact) RETURNING id INTO ev;
    INSERT INTO webhook_deliveries (endpoint_id, event_id)
    SELECT t, ev FROM unnest(targets) AS t ORDER BY t;
    RETURN ev;
END
$$;

-- broadcast.sending|paused|sent|failed|cancelled: every status change of a broadcast, by
-- whatever function (or UPDATE) makes it. Broadcasts change status rarely.
CREATE FUNCTION pgcast_broadcast_event_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgcast_emit_event_v1(NEW.account, 'broadcast.' || NEW.status, jsonb_build_object(
        'broadcast_id', NEW.id, 'status', NEW.status, 'previous_status', OLD.status,
        'subject', NEW.subject, 'epoch', NEW.epoch,
        'reason', CASE NEW.status WHEN 'paused' THEN NEW.paused_reason
                                  WHEN 'failed' THEN NEW.failed_reason END,
        'counts', jsonb_build_object('total', NEW.total, 'sent', NEW.sent,
                                     'failed', NEW.failed, 'skipped', NEW.skipped,
                                     'unknown', NEW.unknown, 'cancelled', NEW.cancelled)));
    RETURN NULL;
END
$$;
CREATE TRIGGER broadcasts_webhook_event AFTER UPDATE OF status ON broadcasts
    FOR EACH ROW
    WHEN (OLD.status IS DISTINCT FROM NEW.status
          AND NEW.status IN ('sending', 'paused', 'sent', 'failed', 'cancelled'))
    EXECUTE FUNCTION pgcast_broadcast_event_v1();

-- contact.unsubscribed and contact.suppressed: every unsubscribe and suppression is appended
-- to contact_events by whatever path makes it (one-click, API, CLI, import, SES feedback,
-- SQL), with its source; contact.subscribed: a sign-up confirmed (0019's confirm and signup). An erase scrubs the address from the events that name the contact
-- (and from the receivers' answers kept for them).
CREATE FUNCTION pgcast_contact_event_v1() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    c contacts;
BEGIN
    IF NEW.action = 'erase' THEN
        UPDATE webhook_events e
        SET data = e.data || jsonb_build_object('email',
                                                'erased-' || NEW.contact_id || '@erased.invalid')
        WHERE e.account = NEW.account AND e.contact_id = NEW.contact_id;
        UPDATE webhook_deliveries d SET response = NULL
        WHERE d.response IS NOT NULL
          AND d.event_id IN (SELECT e.id FROM webhook_events e
                             WHERE e.account = NEW.account AND e.contact_id = NEW.contact_id);
        RETURN NULL;
    END IF;
    SELECT * INTO c FROM contacts WHERE id = NEW.contact_id;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF NEW.action IN ('confirm', 'signup') THEN
        -- a double opt-in confirmed, or a sign-up on a form without opt-in that confirmed the
        -- contact in this transaction (0019's functions); other sign-ups change nothing yet
        IF NEW.action = 'confirm' OR (NEW.details->>'double_opt_in' = 'false'
                                      AND c.confirmed_at >= now()
                                      AND c.unsubscribed_at IS NULL) THEN
            PERFORM pgcast_contact_subscribed_v1(c.id, NEW.source);
        END IF;
    ELSIF NEW.action = 'unsubscribe' THEN
        PERFORM pgcast_emit_event_v1(NEW.account, 'contact.unsubscribed', jsonb_build_object(
            'contact_id', c.id, 'email', c.email, 'source', NEW.source,
            'broadcast_id', NEW.broadcast_id, 'unsubscribed_at', c.unsubscribed_at), c.id);
    ELSE
        PERFORM pgcast_emit_event_v1(NEW.account, 'contact.suppressed', jsonb_build_object(
            'contact_id', c.id, 'email', c.email, 'source', NEW.source,
            'reason', c.suppressed_reason, 'broadcast_id', NEW.broadcast_id,
            'suppressed_at', c.suppressed_at), c.id);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER contact_events_webhook_event AFTER INSERT ON contact_events
    FOR EACH ROW WHEN (NEW.action IN ('unsubscribe', 'suppress', 'erase', 'confirm', 'signup'))
    EXECUTE FUNCTION pgcast_contact_event_v1();

-- contact.subscribed: a confirmed sign-up, in the caller's transaction (the contact_events
-- trigger calls it for 0019's confirmations; an application may call it for its own).
CREATE FUNCTION pgcast_contact_subscribed_v1(p_contact bigint, p_source text)
RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    c contacts;
BEGIN
    SELECT * INTO c FROM contacts WHERE id = p_contact;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    RETURN pgcast_emit_event_v1(c.account, 'contact.subscribed', jsonb_build_object(
        'contact_id', c.id, 'email', c.email, 'source', p_source,
        'subscribed_at', clock_timestamp()), c.id);
END
$$;

-- record: one attempt's outcome, only while the caller's lease on the endpoint holds (a
-- worker whose lease ran out records nothing: the next one delivers again). A success
-- delivers the row and extends the lease; a failure schedules the next attempt (exponential:
-- p_base * 2^(attempts-1), at most 6 hours) and gives the endpoint back; a failure whose
-- first attempt is older than p_give_up fails the row and disables the endpoint, with an
-- audit entry. Returns 'delivered', 'retry', 'disabled', or NULL (lease lost).
CREATE FUNCTION pgcast_webhook_record_v1(p_endpoint uuid, p_token uuid, p_delivery bigint,
                                         p_ok boolean, p_status integer, p_error text,
                                         p_latency_ms double precision, p_response text,
                                         p_lease interval, p_base interval, p_give_up interval)
RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
    d webhook_deliveries;
    now_ timestamptz := clock_timestamp();
BEGIN
    -- a record lost to a crash only delivers the event again (at least once): no flush
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM 1 FROM webhook_endpoints e
    WHERE e.id = p_endpoint AND e.lease_token = p_token AND e.lease_expires_at > now_
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO d FROM webhook_deliveries
    WHERE id = p_delivery AND endpoint_id = p_endpoint AND status = 'pending' FOR UPDATE;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF p_ok THEN
        UPDATE webhook_deliveries
        SET status = 'delivered', attempts = attempts + 1, last_attempt_at = now_,
            first_attempt_at = coalesce(first_attempt_at, now_),
            last_status = p_status, last_error = NULL, latency_ms = p_latency_ms,
            response = left(p_response, 1024), delivered_at = now_
        WHERE id = p_delivery;
        UPDATE webhook_endpoints SET lease_expires_at = now_ + p_lease WHERE id = p_endpoint;
        RETURN 'delivered';
    END IF;
    IF coalesce(d.first_attempt_at, now_) < now_ - p_give_up THEN
        UPDATE webhook_deliveries
        SET status = 'failed', attempts = attempts + 1, last_attempt_at = now_,
            last_status = p_status, last_error = left(p_error, 1000), latency_ms = p_latency_ms,
            response = left(p_response, 1024)
        WHERE id = p_delivery;
        UPDATE webhook_endpoints
        SET enabled = false, disabled_at = now_,
            disabled_reason = 'failing since ' || d.first_attempt_at || ': ' || left(p_error, 200),
            lease_token = NULL, lease_expires_at = NULL, worker = NULL,
            audit_log = audit_log || jsonb_build_array(jsonb_build_object(
                'at', now_, 'action', 'disable', 'delivery_id', p_delivery,
                'attempts', d.attempts + 1, 'error', left(p_error, 200)))
        WHERE id = p_endpoint;
        RETURN 'disabled';
    END IF;
    UPDATE webhook_deliveries
    SET attempts = attempts + 1, last_attempt_at = now_, last_status = p_status,
        first_attempt_at = coalesce(first_attempt_at, now_),
        last_error = left(p_error, 1000), latency_ms = p_latency_ms,
        response = left(p_response, 1024),
        next_attempt_at = now_ + least(p_base * power(2, least(d.attempts, 30)),
                                       interval '6 hours')
    WHERE id = p_delivery;
    UPDATE webhook_endpoints SET lease_token = NULL, lease_expires_at = NULL, worker = NULL
    WHERE id = p_endpoint;
    RETURN 'retry';
END
$$;

-- message.sent|failed|delivered|bounced|complained: every status change of a transactional
-- message to sent, failed or skipped (message.failed, its status says which), and the first
-- delivery, bounce or complaint SES reports for it, by whatever function makes the change.
-- One row per message (never per broadcast recipient). No address and no free text (errors,
-- bounce diagnostics quote addresses): an erase leaves nothing here to scrub.
CREATE FUNCTION pgcast_message_event_v1() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    kinds text[] := '{}';
    k text;
BEGIN
    IF OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('sent', 'failed', 'skipped') THEN
        kinds := kinds || CASE NEW.status WHEN 'sent' THEN 'message.sent'
                                          ELSE 'message.failed' END;
    END IF;
    IF OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL THEN
        kinds := kinds || 'message.delivered'::text;
    END IF;
    IF OLD.bounced_at IS NULL AND NEW.bounced_at IS NOT NULL THEN
        kinds := kinds || 'message.bounced'::text;
    END IF;
    IF OLD.complained_at IS NULL AND NEW.complained_at IS NOT NULL THEN
        kinds := kinds || 'message.complained'::text;
    END IF;
    FOREACH k IN ARRAY kinds LOOP
        PERFORM pgcast_emit_event_v1(NEW.account, k, jsonb_build_object(
            'message_id', NEW.id, 'idempotency_key', NEW.idempotency_key,
            'category', NEW.category, 'status', NEW.status, 'attempts', NEW.attempts,
            'provider_message_id', NEW.provider_message_id, 'sent_at', NEW.sent_at,
            'delivered_at', NEW.delivered_at, 'bounced_at', NEW.bounced_at,
            'complained_at', NEW.complained_at));
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER messages_webhook_event
    AFTER UPDATE OF status, delivered_at, bounced_at, complained_at ON messages
    FOR EACH ROW
    WHEN ((OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('sent', 'failed', 'skipped'))
          OR (OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL)
          OR (OLD.bounced_at IS NULL AND NEW.bounced_at IS NOT NULL)
          OR (OLD.complained_at IS NULL AND NEW.complained_at IS NOT NULL))
    EXECUTE FUNCTION pgcast_message_event_v1();

-- 0022_rate_epoch (issue 31): a broadcast's rate after a retry counts from the retry.
-- `rate` (progress, `broadcast status`) was the recipients finished over the time since
-- started_at, the first start: after a retry it averaged in the whole wait between the first
-- run's end and the retry. A retry now records when its epoch started and how many recipients
-- were finished then; the rate is (finished now - finished then) / (time since then).
-- NULL epoch_started_at: the first run (started_at, nothing finished before it).

-- when the current epoch began by a retry; NULL: never retried (the rate counts from started_at)
ALTER TABLE broadcasts ADD COLUMN epoch_started_at timestamptz;
-- recipients finished (sent, failed, skipped, unknown) when that epoch began
ALTER TABLE broadcasts ADD COLUMN epoch_done integer NOT NULL DEFAULT 0;

-- retry, v3: v2, and it sets epoch_started_at and epoch_done.
CREATE FUNCTION pgcast_retry_v3(p_account text, p_id uuid, p_include_unknown boolean,
                                p_in_doubt double precision, p_details jsonb)
RETURNS TABLE (ok boolean, status text, requeued integer, in_doubt integer, archiving boolean)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    st text;
    arch boolean;
    ids bigint[];
    n_unknown integer;
    n_doubt integer := 0;
    cutoff timestamptz;
    e integer;
BEGIN
    -- an acknowledged retry is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT b.status, b.archiving_at IS NOT NULL OR b.archived_at IS NOT NULL INTO st, arch
    FROM broadcasts b WHERE b.id = p_id AND b.account = p_account
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF st NOT IN ('sent', 'failed') OR arch THEN
        RETURN QUERY SELECT false, st, 0, 0, arch;
        RETURN;
    END IF;
    cutoff := clock_timestamp() - make_interval(secs => greatest(p_in_doubt, 0));
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL
          AND l.status IN ('failed', 'unknown')
          AND (l.status = 'failed'
               OR (p_include_unknown AND (l.handed_at IS NULL OR l.handed_at <= cutoff)))
        ORDER BY l.contact_id FOR UPDATE);
    IF p_include_unknown THEN
        -- a record of these rows takes the broadcast row first: this count is stable
        SELECT count(*) INTO n_doubt FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'unknown'
          AND l.handed_at > cutoff;
    END IF;
    IF cardinality(ids) = 0 THEN
        RETURN QUERY SELECT false, st, 0, n_doubt, false;
        RETURN;
    END IF;
    SELECT count(*) FILTER (WHERE r.status = 'unknown') INTO n_unknown
    FROM broadcast_recipients r WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcast_recipients r
    SET status = 'pending', attempts = 0, retry_at = NULL,
        claim_token = CASE WHEN r.status = 'unknown' THEN r.claim_token END,
        claim_epoch = NULL, lease_expires_at = NULL, handed_at = NULL,
        provider_message_id = NULL, last_error = NULL, sent_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ids);
    UPDATE broadcasts AS u
    SET status = 'sending', epoch = u.epoch + 1,
        failed = u.failed - (cardinality(ids) - n_unknown), unknown = u.unknown - n_unknown,
        failure_streak = 0, paused_reason = NULL, failed_reason = NULL, finished_at = NULL,
        updated_at = now(),
        -- the rate counts from here: now, and what was finished after the requeue
        epoch_started_at = now(),
        epoch_done = u.sent + u.skipped + (u.failed - (cardinality(ids) - n_unknown))
                     + (u.unknown - n_unknown),
        audit_log = u.audit_log || pgcast_audit_v1('retry', u.status, 'sending',
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('requeued', cardinality(ids),
                                  'failed', cardinality(ids) - n_unknown,
                                  'unknown', n_unknown, 'include_unknown', p_include_unknown)
            || CASE WHEN p_include_unknown
                    THEN jsonb_build_object('in_doubt', n_doubt, 'in_doubt_seconds', p_in_doubt)
                    ELSE '{}'::jsonb END)
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sent', 'failed'])
    RETURNING u.epoch INTO e;
    PERFORM pgcast_notify_v1('retry', p_id, e);
    RETURN QUERY SELECT true, 'sending'::text, cardinality(ids), n_doubt, false;
END
$$;
DROP FUNCTION pgcast_retry_v2(text, uuid, boolean, double precision, jsonb);

-- 0023_review_fences: defects found reviewing issues 26-30 together.
-- * The message fence read only unsubscribed_at for marketing mail: a marketing message went to
--   a contact who signed up on a form and never confirmed (0019). pgcast_message_handoff_v2
--   reads the contact through pgcast_unmailable_reason_v1 for marketing (unsubscribed,
--   suppressed, unconfirmed), as the broadcast handoffs do; every category is still skipped
--   for a suppressed or erased address.
-- * The erase (v4) kept the address where SES and applications put it: a message's error
--   text (SES quotes the recipient), its bounce or complaint diagnostic, and an idempotency
--   key built from the address (also copied into the message.* webhook events); and a
--   record or an SES event that arrived after the erase wrote an error text back.
--   pgcast_erase_v6 scrubs them, and a trigger keeps them scrubbed.
-- * A complaint about a message was only noted on the message: pgcast_message_feedback_v2
--   suppresses the contact too.
-- * The message handoff took several accounts' contacts fences by name, an untagged hard
--   bounce by lock key (hashtext): they deadlocked. v2 takes them by key.
-- * Record and renew locked one claim's rows in different orders and deadlocked: v2 of both
--   lock them in id order first (DESIGN: rows sorted by key, taken in one pass).

-- handoff of messages, v2: v1 with the marketing fence through pgcast_unmailable_reason_v1
-- (an unconfirmed contact is skipped, 'unconfirmed'). The locks of v1 (the contacts fence of
-- each account: shared; exclusive in every writer of the columns read, confirmed_at included
-- since 0019; then the message rows in id order), the fences now in the order of their keys.
CREATE FUNCTION pgcast_message_handoff_v2(p_token uuid, p_ids uuid[])
RETURNS TABLE (id uuid, account text, category text, to_address text, from_address text,
               reply_to text, subject text, text_body text, html_body text, headers jsonb,
               tags jsonb, attempts smallint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    -- in the order of the locks' keys, as every writer that takes several accounts' fences
    -- (an untagged hard bounce: pgcast_ses_event_v1); by name v1 deadlocked with it
    FOR acct IN SELECT a.account FROM (SELECT DISTINCT m.account FROM messages m
                                       WHERE m.id = ANY (p_ids)) a
                ORDER BY hashtext(a.account), a.account LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    END LOOP;
    locked := ARRAY(
        SELECT m.id FROM messages m
        WHERE m.id = ANY (p_ids) AND m.status = 'queued' AND m.claim_token = p_token
          AND m.lease_expires_at > clock_timestamp()
        ORDER BY m.id FOR UPDATE);
    UPDATE messages m
    SET status = 'skipped', finished_at = clock_timestamp(), claim_token = NULL,
        lease_expires_at = NULL, last_error = g.why
    FROM (SELECT q.id,
                 CASE WHEN q.to_address = 'erased@erased.invalid'
                           OR pgcast_erased_v1(q.account, q.to_address) THEN 'contact erased'
                      WHEN c.suppressed_at IS NOT NULL
                           THEN 'suppressed: ' || c.suppressed_reason
                      WHEN q.category = 'marketing' AND c.id IS NOT NULL
                           THEN pgcast_unmailable_reason_v1(c)
                 END AS why
          FROM messages q
          LEFT JOIN contacts c ON c.account = q.account AND lower(c.email) = lower(q.to_address)
          WHERE q.id = ANY (locked)) g
    WHERE m.id = g.id AND g.why IS NOT NULL;
    RETURN QUERY
    UPDATE messages m SET status = 'sending', handed_at = clock_timestamp()
    WHERE m.id = ANY (locked) AND m.status = 'queued'
    RETURNING m.id, m.account, m.category, m.to_address, m.from_address, m.reply_to,
              m.subject, m.text_body, m.html_body, m.headers, m.tags, m.attempts;
END
$$;

-- erase, v6: v3, then the account's messages to the address, locked in id order (as the
-- message handoff and record take them; v4 updated them in its plan's order), lose the
-- address as in v4 (a queued one is skipped; the placeholder address, no subject, no bodies)
-- and also their error texts and feedback diagnostics (SES quotes the address), and an
-- idempotency key that holds the address becomes 'erased:' || id (also in the message.*
-- webhook events that copied it, whose kept answers are dropped); a message to someone else
-- loses a reply-to or a key that holds the address. After v3's locks (the
-- erasure lock, the contact row, the contacts fence when there is a contact): message rows,
-- then webhook event and delivery rows.
CREATE FUNCTION pgcast_erase_v6(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := lower(btrim(p_email));
    v record;
    ids uuid[];
    rekeyed jsonb;
    n bigint;
BEGIN
    SELECT * INTO v FROM pgcast_erase_v3(p_account, p_email, p_source, p_actor);
    -- the messages to the address, and those to others that name it in their reply-to or
    -- their idempotency key (a contact form's answer to the person, a key built from it)
    ids := ARRAY(SELECT m.id FROM messages m
                 WHERE m.account = p_account
                   AND (lower(m.to_address) = addr OR strpos(lower(m.reply_to), addr) > 0
                        OR strpos(lower(m.idempotency_key), addr) > 0)
                 ORDER BY m.id FOR UPDATE);
    WITH changed AS (
        UPDATE messages m
        SET to_address = CASE WHEN lower(m.to_address) = addr THEN 'erased@erased.invalid'
                              ELSE m.to_address END,
            subject = CASE WHEN lower(m.to_address) = addr THEN '(erased)' ELSE m.subject END,
            text_body = CASE WHEN lower(m.to_address) = addr THEN '' ELSE m.text_body END,
            html_body = CASE WHEN lower(m.to_address) = addr THEN NULL ELSE m.html_body END,
            headers = CASE WHEN lower(m.to_address) = addr THEN '{}' ELSE m.headers END,
            tags = CASE WHEN lower(m.to_address) = addr THEN '{}' ELSE m.tags END,
            reply_to = CASE WHEN lower(m.to_address) = addr
                                 OR strpos(lower(m.reply_to), addr) > 0 THEN NULL
                            ELSE m.reply_to END,
            status = CASE WHEN lower(m.to_address) = addr AND m.status = 'queued'
                          THEN 'skipped' ELSE m.status END,
            last_error = CASE WHEN lower(m.to_address) <> addr THEN m.last_error
                              WHEN m.status = 'queued' THEN 'contact erased'
                              WHEN m.last_error IS NULL OR m.last_error LIKE 'in doubt:%'
                                   THEN m.last_error
                              ELSE 'contact erased: error text not kept' END,
            feedback_detail = CASE WHEN lower(m.to_address) <> addr THEN m.feedback_detail
                                   WHEN m.feedback_detail IS NOT NULL
                                   THEN 'contact erased: detail not kept' END,
            idempotency_key = CASE WHEN strpos(lower(m.idempotency_key), addr) > 0
                                   THEN 'erased:' || m.id ELSE m.idempotency_key END,
            finished_at = CASE WHEN lower(m.to_address) = addr
                               THEN coalesce(m.finished_at, clock_timestamp())
                               ELSE m.finished_at END,
            claim_token = CASE WHEN lower(m.to_address) = addr AND m.status = 'queued'
                               THEN NULL ELSE m.claim_token END
        WHERE m.id = ANY (ids)
        RETURNING m.id, m.idempotency_key
    )
    SELECT jsonb_object_agg(c.id::text, c.idempotency_key) FILTER (
               WHERE c.idempotency_key = 'erased:' || c.id),
           count(*)
    INTO rekeyed, n FROM changed c;
    IF rekeyed IS NOT NULL THEN
        UPDATE webhook_events e
        SET data = e.data || jsonb_build_object('idempotency_key',
                                                rekeyed ->> (e.data ->> 'message_id'))
        WHERE e.account = p_account AND e.type LIKE 'message.%'
          AND rekeyed ? (e.data ->> 'message_id');
        -- and the receivers' answers kept for them (one may echo what it got)
        UPDATE webhook_deliveries d SET response = NULL
        WHERE d.response IS NOT NULL
          AND d.event_id IN (SELECT e.id FROM webhook_events e
                             WHERE e.account = p_account AND e.type LIKE 'message.%'
                               AND rekeyed ? (e.data ->> 'message_id'));
    END IF;
    -- and the contact's opens and clicks in the account's broadcasts (as 0020's v5 did)
    IF v.contact_id IS NOT NULL THEN
        DELETE FROM tracking_events e
        WHERE e.contact_id = v.contact_id
          AND e.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
        DELETE FROM tracking_firsts f
        WHERE f.contact_id = v.contact_id
          AND f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
    END IF;
    RETURN QUERY SELECT v.contact_id, v.recipients, n;
END
$$;

-- A message whose address was erased keeps no error text and no feedback diagnostic:
-- whoever writes one later (a record or an SES event after the erase, quoting the address),
-- a fixed text is stored instead. Fires only for the rare rows the erase rewrote.
CREATE FUNCTION pgcast_message_erased_text_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_error IS NOT NULL AND NEW.last_error IS DISTINCT FROM OLD.last_error
       AND NEW.last_error NOT IN ('contact erased', 'contact erased: error text not kept')
       AND NEW.last_error NOT LIKE 'in doubt:%' THEN
        NEW.last_error := 'contact erased: error text not kept';
    END IF;
    IF NEW.feedback_detail IS NOT NULL
       AND NEW.feedback_detail IS DISTINCT FROM OLD.feedback_detail THEN
        NEW.feedback_detail := 'contact erased: detail not kept';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER messages_erased_text
    BEFORE UPDATE OF last_error, feedback_detail ON messages
    FOR EACH ROW
    WHEN (NEW.to_address = 'erased@erased.invalid')
    EXECUTE FUNCTION pgcast_message_erased_text_v1();

-- enqueue, v2: v1, except that a message to an erased address whose idempotency key holds the
-- address is stored without its key (the row is skipped whatever it says; a retry with the
-- same key is another skipped row, never the address kept), and an erased reply-to is not
-- stored (the message goes without it; nor a key that holds it).
CREATE FUNCTION pgcast_send_message_v2(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, created boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := btrim(coalesce(p_to, ''));
    sender text;
    allowed text[];
    mid uuid;
    st text;
    erased boolean;
    reply text := lower(btrim(coalesce(substring(p_reply_to FROM '<([^<>]*)>\s*$'),
                                       p_reply_to)));
    reply_erased boolean;
BEGIN
    IF p_account IS NULL OR char_length(p_account) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'account must be 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF addr !~ '^[^@\s<>(),;:"\[\]\\]+@[^@\s<>(),;:"\[\]\\]+\.[^@\s<>(),;:"\[\]\\]+$'
       OR char_length(addr) > 254 THEN
        RAISE EXCEPTION 'to: % is not an email address', p_to USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_subject, '')) = '' THEN
        RAISE EXCEPTION 'subject must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_text IS NULL AND p_html IS NULL THEN
        RAISE EXCEPTION 'a message needs a text or an html body' USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_from, '')) = '' THEN
        RAISE EXCEPTION 'from must not be empty' USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_category, '') NOT IN ('transactional', 'marketing', 'confirmation') THEN
        RAISE EXCEPTION 'category must be transactional, marketing or confirmation, not %',
            p_category USING ERRCODE = '22023';
    END IF;
    -- the senders rule (0015): with senders, the From's address must be one or at one
    allowed := ARRAY(SELECT s.sender FROM senders s WHERE s.account = p_account);
    IF cardinality(allowed) > 0 THEN
        sender := lower(btrim(coalesce(substring(p_from FROM '<([^<>]*)>\s*$'), p_from)));
        IF NOT (sender = ANY (allowed) OR split_part(sender, '@', 2) = ANY (allowed)) THEN
            RAISE EXCEPTION 'from: % is not a sender this account may use', sender
                USING ERRCODE = '22023',
                      HINT = 'an operator allows more with `pgcast senders add`';
        END IF;
    END IF;
    -- an erase cannot commit between this check and the insert
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    erased := pgcast_erased_v1(p_account, addr);
    reply_erased := reply <> '' AND pgcast_erased_v1(p_account, reply);
    INSERT INTO messages AS m (account, idempotency_key, category, status, to_address,
                               from_address, reply_to, subject, text_body, html_body, headers,
                               tags, last_error, finished_at)
    VALUES (p_account,
            CASE WHEN (erased AND strpos(lower(p_key), lower(addr)) > 0)
                      OR (reply_erased AND strpos(lower(p_key), reply) > 0) THEN NULL
                 ELSE p_key END,
            p_category, CASE WHEN erased THEN 'skipped' ELSE 'queued' END,
            CASE WHEN erased THEN 'erased@erased.invalid' ELSE addr END, btrim(p_from),
            CASE WHEN NOT erased AND NOT coalesce(reply_erased, false) THEN p_reply_to END,
            CASE WHEN erased THEN '(erased)' ELSE p_subject END,
            CASE WHEN erased THEN '' ELSE p_text END, CASE WHEN NOT erased THEN p_html END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_headers, '{}') END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_tags, '{}') END,
            CASE WHEN erased THEN 'contact erased' END,
            CASE WHEN erased THEN clock_timestamp() END)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING m.id, m.status INTO mid, st;
    IF mid IS NOT NULL THEN
        IF st = 'queued' THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names (never renamed) wrap v2 from here on.
CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v2(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text,
                                               category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v2(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- SES feedback about a message, v2: v1, and a complaint also suppresses (and unsubscribes)
-- the contact of the message's account with its address, as a complaint about a broadcast
-- does (pgcast_contact_feedback_v1): an untagged complaint is only logged by
-- pgcast_ses_event_v2, so a person who complained about a marketing message kept getting
-- broadcasts. A hard bounce needs nothing more (pgcast_ses_event_v2 suppresses the address in
-- every account). Lock order as the erase's: the contact row (then the contacts fence, by
-- 0005's trigger), then the message row.
CREATE FUNCTION pgcast_message_feedback_v2(p_provider_id text, p_event text, p_at timestamptz,
                                           p_detail text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    m record;
    cid bigint;
BEGIN
    IF p_event = 'complaint' THEN
        SELECT q.account, q.to_address INTO m FROM messages q
        WHERE q.provider_message_id = p_provider_id;
        IF FOUND THEN
            SELECT k.id INTO cid FROM contacts k
            WHERE k.account = m.account AND lower(k.email) = lower(m.to_address)
            FOR NO KEY UPDATE;
            IF cid IS NOT NULL THEN
                PERFORM pgcast_contact_feedback_v1(cid, p_event, p_detail, p_at, 0, NULL,
                                                   NULL);
            END IF;
        END IF;
    END IF;
    RETURN pgcast_message_feedback_v1(p_provider_id, p_event, p_at, p_detail);
END
$$;

-- record, v2: v1 with the claim's rows locked in id order first (ARRAY ... ORDER BY id FOR
-- UPDATE), then updated by key. v1 locked them in its plan's order (the in-flight index: lease
-- order) while renew v1 locked them in scan order: the two deadlocked on one claim's rows, and
-- Postgres aborted one (an outcome lost: the rows ended unknown; or the renewer stopped).
CREATE FUNCTION pgcast_message_record_v2(p_token uuid, p_ids uuid[], p_outcomes text[],
                                         p_message_ids text[], p_errors text[],
                                         p_retry_in double precision[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    locked := ARRAY(SELECT q.id FROM messages q
                    WHERE q.id = ANY (p_ids) AND q.status = 'sending' AND q.claim_token = p_token
                    ORDER BY q.id FOR UPDATE);
    UPDATE messages m
    SET status = CASE o.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed'
                                WHEN 'unknown' THEN 'unknown' ELSE 'queued' END,
        attempts = m.attempts + CASE WHEN o.outcome IN ('throttled', 'release') THEN 0 ELSE 1 END,
        provider_message_id = coalesce(o.message_id, m.provider_message_id),
        last_error = CASE WHEN o.outcome = 'sent' THEN NULL ELSE o.error END,
        sent_at = CASE WHEN o.outcome = 'sent' THEN clock_timestamp() ELSE m.sent_at END,
        finished_at = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown')
                           THEN clock_timestamp() END,
        claim_token = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown') THEN m.claim_token END,
        lease_expires_at = NULL,
        not_before = CASE WHEN o.outcome IN ('retry', 'throttled', 'release')
                          THEN clock_timestamp() + make_interval(secs => coalesce(o.retry_in, 0))
                          ELSE m.not_before END
    FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
         AS o(id, outcome, message_id, error, retry_in)
    WHERE m.id = o.id AND m.id = ANY (locked) AND m.status = 'sending'
      AND m.claim_token = p_token;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- renew, v2: v1 with the claims' rows locked in id order first, then updated by key (see
-- record v2), found by an index of the claimed rows (v1 read the whole table every renewal).
CREATE INDEX messages_claimed ON messages (claim_token)
    WHERE status IN ('queued', 'sending') AND claim_token IS NOT NULL;
CREATE FUNCTION pgcast_message_renew_v2(p_tokens uuid[], p_lease interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET lease_expires_at = clock_timestamp() + p_lease,
        not_before = CASE WHEN m.status = 'queued' THEN clock_timestamp() + p_lease
                          ELSE m.not_before END
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q
                            WHERE q.claim_token = ANY (p_tokens) AND q.claim_token IS NOT NULL
                              AND q.status IN ('queued', 'sending')
                              AND q.lease_expires_at > clock_timestamp()
                            ORDER BY q.id FOR UPDATE))
      AND m.claim_token = ANY (p_tokens) AND m.status IN ('queued', 'sending')
      AND m.lease_expires_at > clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

DROP FUNCTION pgcast_message_handoff_v1(uuid, uuid[]);
DROP FUNCTION pgcast_send_message_v1(text, text, text, text, text, text, text, text, text, jsonb,
                                     jsonb);
DROP FUNCTION pgcast_message_record_v1(uuid, uuid[], text[], text[], text[],
                                       double precision[]);
DROP FUNCTION pgcast_message_renew_v1(uuid[], interval);
DROP FUNCTION pgcast_erase_v5(text, text, text, jsonb);
DROP FUNCTION pgcast_erase_v4(text, text, text, jsonb);

-- 0024_message_unsubscribe (issue 26): a marketing message carries one-click unsubscribe
-- (RFC 8058) as a broadcast does. Its token names the message (mail.unsubscribe, kind 2); the
-- POST unsubscribes, account-wide, the contact of the message's account with the message's
-- address, and records it in contact_events (source 'message-one-click', the message's id in
-- details). An address that is no contact of the account becomes one, unsubscribed (and not
-- confirmed: it never opted in), so that later marketing messages and broadcasts skip it.

-- One-click unsubscribe from a marketing message: the contact's id and whether this call
-- changed anything (no row: no marketing message with that id, or its address was erased).
-- Locks, in the order every path takes them: the erasure lock (shared, as every writer that
-- could bring an address back: an erase that committed first leaves the placeholder address,
-- read after the lock, or the keyed hash), the contact row (or the row inserted), then the
-- contacts fence (exclusive: the fence trigger for an update; taken here for an insert, so
-- that a marketing handoff that reads the contacts after this commits sees the new row).
CREATE FUNCTION pgcast_unsubscribe_message_v1(p_message uuid)
RETURNS TABLE (contact_id bigint, changed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    acct text;
    addr text;
    cid bigint;
    was timestamptz;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT m.account INTO acct FROM messages m
    WHERE m.id = p_message AND m.category = 'marketing';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(acct));
    -- after the lock: an erase that committed meanwhile has rewritten the address
    SELECT m.to_address INTO addr FROM messages m WHERE m.id = p_message;
    IF addr = 'erased@erased.invalid' OR pgcast_erased_v1(acct, addr) THEN
        RETURN;
    END IF;
    LOOP
        SELECT c.id, c.unsubscribed_at INTO cid, was FROM contacts c
        WHERE c.account = acct AND lower(c.email) = lower(addr)
        FOR UPDATE;
        IF FOUND THEN
            IF was IS NOT NULL THEN  -- the first time is kept
                RETURN QUERY SELECT cid, false;
                RETURN;
            END IF;
            UPDATE contacts c SET unsubscribed_at = clock_timestamp(), updated_at = now()
            WHERE c.id = cid;
            EXIT;
        END IF;
        INSERT INTO contacts (account, email, unsubscribed_at, confirmed_at)
        VALUES (acct, addr, clock_timestamp(), NULL)
        ON CONFLICT DO NOTHING
        RETURNING id INTO cid;
        IF cid IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(acct));
            EXIT;
        END IF;
        -- inserted by someone else meanwhile (an import): lock theirs
    END LOOP;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (acct, cid, 'unsubscribe', 'message-one-click', '{"via": "one-click"}',
            jsonb_build_object('message_id', p_message));
    RETURN QUERY SELECT cid, true;
END
$$;

-- The share of a bucket's rate messages may take while broadcasts wait, v2: v1 refuses a share
-- that is not more than 0 and at most 1 (SQLSTATE 22023). A share of 0 held messages back for
-- as long as any broadcast waited for tokens (a password reset behind a whole broadcast):
-- messages come ahead of broadcasts, and a small share still gives them a steady part. A 0
-- already stored (set through v1 or by hand) keeps its meaning: messages take tokens only
-- when no broadcast is waiting.
CREATE FUNCTION pgcast_messages_share_v2(p_name text, p_share double precision)
RETURNS TABLE (name text, messages_share double precision)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_share IS NULL OR NOT (p_share > 0 AND p_share <= 1) THEN
        RAISE EXCEPTION 'the messages share must be more than 0 and at most 1, not %', p_share
            USING ERRCODE = '22023',
                  HINT = '0 would hold messages back for as long as broadcasts wait';
    END IF;
    RETURN QUERY
    UPDATE rate_limits r SET messages_share = p_share, updated_at = now()
    WHERE r.name = p_name
    RETURNING r.name, r.messages_share;
END
$$;

-- 0025_rate_slots (issue 26): one wire schedule for every process and host.
-- The bucket bounded the grants, but each worker process spaced its own calls at the full
-- global rate, so grants made in one second could reach SES together in the next (two
-- processes each sending a backlog of granted tokens at full rate for a moment: 106 and 116
-- calls in the busiest second at the endpoint against rate + burst = 105).
-- * rate_limits.next_slot: the bucket's "theoretical arrival time" of the next call (GCRA,
--   virtual scheduling). Each take that grants g tokens also books g wire slots, under the
--   same advisory lock: the first at greatest(now + lead, next_slot), one every 1 / rate after
--   it; next_slot moves past the last. The slots of all takes never overlap, so no window of
--   w seconds holds more than rate x w + 1 of them, whoever took them.
-- * The slots come back as an offset in seconds from the database's clock_timestamp() (and
--   that clock as epoch seconds), so a worker maps them to its own monotonic clock without
--   any clock sync between hosts (worker.ratelimit.Slots). p_lead (0 to 1 s): how far ahead
--   of now the caller's first slot may be at the earliest, the time it needs from the grant
--   to the wire (its handoff commit, its threads); a late call is the only source of bunching,
--   and the bucket's burst is left as slack for it.
-- * A rate change rescales the schedule already booked to the new rate at once (the BEFORE
--   trigger rate_limits_schedule, pgcast_rate_changed_v2): the calls already booked still
--   count, at the new rate. To or from unlimited (0), the schedule is forgotten.
-- * Unlimited (rate 0): no slot is booked and nothing is returned (NULL offset).
ALTER TABLE rate_limits ADD COLUMN next_slot timestamptz;

-- take, v5: v4 (the bucket, fair shares, the messages' reserve), then the granted tokens' wire
-- slots. slot_offset: seconds from taken_at (the database's clock_timestamp(), epoch seconds)
-- to the first slot; slot_spacing: seconds between slots (1 / rate). NULL: no slot (nothing
-- granted, or no limit). slot_slack: (burst - 1) / rate, the lateness the bucket's burst
-- absorbs (a call later than that for its slot could make a second hold more than rate + burst).
CREATE FUNCTION pgcast_take_tokens_v5(p_name text, p_want integer, p_broadcast uuid,
                                      p_lead double precision)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean,
               slot_offset double precision, slot_spacing double precision,
               taken_at double precision, slot_slack double precision)
LANGUAGE plpgsql AS $$
DECLARE
    g integer;
    w double precision;
    a boolean;
    t timestamptz;
    first timestamptz;
    r double precision;
    k double precision;
BEGIN
    -- v4 takes the bucket's rate lock (held to the end of the transaction) and commits
    -- asynchronously: the slots are booked under the same lock, in the same transaction
    SELECT v.granted, v.wait_seconds, v.ahead INTO g, w, a
    FROM pgcast_take_tokens_v4(p_name, p_want, p_broadcast) v;
    IF g > 0 THEN
        t := clock_timestamp();
        -- one statement on the row as it is now: a rate change that committed meanwhile
        -- (rescaled by its trigger) is the one the slots follow
        UPDATE rate_limits l
        SET next_slot = greatest(l.next_slot, t + make_interval(
                                     secs => least(1, greatest(0, coalesce(p_lead, 0)))))
                        + make_interval(secs => g / l.rate)
        WHERE l.name = p_name AND l.rate > 0
        RETURNING l.next_slot - make_interval(secs => g / l.rate), l.rate,
                  greatest(0, l.burst - 1) / l.rate INTO first, r, k;
        IF FOUND THEN
            RETURN QUERY SELECT g, w, a, extract(epoch FROM first - t)::double precision,
                                1 / r, extract(epoch FROM t)::double precision, k;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT g, w, a, NULL::double precision, NULL::double precision,
                        NULL::double precision, NULL::double precision;
END
$$;

-- take for messages, v2: v1 (ahead of broadcasts, up to their share), then the granted tokens'
-- wire slots from the same schedule as v5's.
CREATE FUNCTION pgcast_take_tokens_messages_v2(p_name text, p_want integer,
                                               p_lead double precision)
RETURNS TABLE (granted integer, wait_seconds double precision,
               slot_offset double precision, slot_spacing double precision,
               taken_at double precision, slot_slack double precision)
LANGUAGE plpgsql AS $$
DECLARE
    g integer;
    w double precision;
    t timestamptz;
    first timestamptz;
    r double precision;
    k double precision;
BEGIN
    SELECT v.granted, v.wait_seconds INTO g, w
    FROM pgcast_take_tokens_messages_v1(p_name, p_want) v;
    IF g > 0 THEN
        t := clock_timestamp();
        UPDATE rate_limits l
        SET next_slot = greatest(l.next_slot, t + make_interval(
                                     secs => least(1, greatest(0, coalesce(p_lead, 0)))))
                        + make_interval(secs => g / l.rate)
        WHERE l.name = p_name AND l.rate > 0
        RETURNING l.next_slot - make_interval(secs => g / l.rate), l.rate,
                  greatest(0, l.burst - 1) / l.rate INTO first, r, k;
        IF FOUND THEN
            RETURN QUERY SELECT g, w, extract(epoch FROM first - t)::double precision, 1 / r,
                                extract(epoch FROM t)::double precision, k;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT g, w, NULL::double precision, NULL::double precision,
                        NULL::double precision, NULL::double precision;
END
$$;

-- For software other than pgcast, with its slots: up to n tokens from the global bucket with
-- the priority of messages, and their wire slots (no lead: the first slot is now, or where the
-- schedule is). Send the i-th granted call (from 0) slot_offset + i x slot_spacing seconds
-- after the answer; NULL offset: no limit, send at once.
CREATE FUNCTION pgcast_take_tokens_external_v2(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision,
               slot_offset double precision, slot_spacing double precision)
LANGUAGE sql AS $$
    SELECT v.granted, v.wait_seconds, v.slot_offset, v.slot_spacing
    FROM pgcast_take_tokens_messages_v2('global', n, 0) v
$$;

-- The stable name (its signature never changes), now on the schedule: `granted` tokens; when
-- granted is 0, wait wait_seconds and ask again; when it is more, wait wait_seconds (the
-- offset of the first booked slot: 0 while the schedule is idle) and send no faster than one
-- call every 1 / rate. A caller that sends at once is early by at most wait_seconds.
CREATE OR REPLACE FUNCTION pgcast_take_tokens_external(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE sql AS $$
    SELECT v.granted, CASE WHEN v.granted > 0 THEN greatest(0, coalesce(v.slot_offset, 0))
                           ELSE v.wait_seconds END
    FROM pgcast_take_tokens_external_v2(n) v
$$;

-- A rate change reaches the schedule at once: the slots already booked ahead of now (k of
-- them at the old rate) take k / new rate from now at the new one; to or from unlimited, the
-- schedule is forgotten. (The NOTIFY stays with rate_limits_changed, pgcast_rate_changed_v1.)
CREATE FUNCTION pgcast_rate_changed_v2() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    IF NEW.rate IS DISTINCT FROM OLD.rate THEN
        t := clock_timestamp();
        IF NEW.rate > 0 AND OLD.rate > 0 AND OLD.next_slot > t THEN
            NEW.next_slot := t + (OLD.next_slot - t) * (OLD.rate / NEW.rate);
        ELSE
            NEW.next_slot := NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER rate_limits_schedule BEFORE UPDATE OF rate ON rate_limits
    FOR EACH ROW EXECUTE FUNCTION pgcast_rate_changed_v2();

-- 0026_signup_wake (issue 28): a sign-up no longer NOTIFYs in its own transaction.
-- Measured (bench.signup, pg_stat_activity sampled every 10 ms, 200 sign-ups/s): on average 4
-- sessions, 7 while a broadcast drained, waited on Lock:object in the sign-up statement. That
-- is the lock a transaction that NOTIFYs takes at commit and holds through its commit's WAL
-- flush: every sign-up (pgcast_send_message_v2 NOTIFYs each queued message) committed behind
-- the previous one's fsync, one at a time, so one API process managed 100-136 sign-ups/s with
-- a p99 of seconds while the API process used a quarter of a core.
-- * pgcast_send_message_v3: v2 with p_notify (default true, as before): false queues the
--   message without the NOTIFY, and the caller wakes the message loops after its commit
--   (pgcast_notify_v2). The stable pgcast_send_message wraps v3 from here on (same behaviour).
-- * pgcast_send_confirmation_v2: v1 on v3 without the NOTIFY.
-- * pgcast_signup_v2: one POST /f/{id} in one statement, as pgcast_form_signup_v1, with the
--   confirmation through pgcast_send_confirmation_v2 (no NOTIFY in the sign-up's commit).
-- * pgcast_notify_v2: the message loops' wake-up on its own. The API calls it after the
--   sign-up has committed, in a statement of its own with an asynchronous commit (nothing else
--   is written: a crash loses a wake-up, which the loops' poll stands in for), and at most
--   one in flight per process, so many sign-ups share one NOTIFY (api/wake.py).

-- enqueue, v3: v2 with p_notify; false: no NOTIFY (the caller wakes the loops after commit).
CREATE FUNCTION pgcast_send_message_v3(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}',
                                       p_notify boolean DEFAULT true)
RETURNS TABLE (id uuid, created boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := btrim(coalesce(p_to, ''));
    sender text;
    allowed text[];
    mid uuid;
    st text;
    erased boolean;
    reply text := lower(btrim(coalesce(substring(p_reply_to FROM '<([^<>]*)>\s*$'),
                                       p_reply_to)));
    reply_erased boolean;
BEGIN
    IF p_account IS NULL OR char_length(p_account) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'account must be 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF addr !~ '^[^@\s<>(),;:"\[\]\\]+@[^@\s<>(),;:"\[\]\\]+\.[^@\s<>(),;:"\[\]\\]+$'
       OR char_length(addr) > 254 THEN
        RAISE EXCEPTION 'to: % is not an email address', p_to USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_subject, '')) = '' THEN
        RAISE EXCEPTION 'subject must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_text IS NULL AND p_html IS NULL THEN
        RAISE EXCEPTION 'a message needs a text or an html body' USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_from, '')) = '' THEN
        RAISE EXCEPTION 'from must not be empty' USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_category, '') NOT IN ('transactional', 'marketing', 'confirmation') THEN
        RAISE EXCEPTION 'category must be transactional, marketing or confirmation, not %',
            p_category USING ERRCODE = '22023';
    END IF;
    -- the senders rule (0015): with senders, the From's address must be one or at one
    allowed := ARRAY(SELECT s.sender FROM senders s WHERE s.account = p_account);
    IF cardinality(allowed) > 0 THEN
        sender := lower(btrim(coalesce(substring(p_from FROM '<([^<>]*)>\s*$'), p_from)));
        IF NOT (sender = ANY (allowed) OR split_part(sender, '@', 2) = ANY (allowed)) THEN
            RAISE EXCEPTION 'from: % is not a sender this account may use', sender
                USING ERRCODE = '22023',
                      HINT = 'an operator allows more with `pgcast senders add`';
        END IF;
    END IF;
    -- an erase cannot commit between this check and the insert
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    erased := pgcast_erased_v1(p_account, addr);
    reply_erased := reply <> '' AND pgcast_erased_v1(p_account, reply);
    INSERT INTO messages AS m (account, idempotency_key, category, status, to_address,
                               from_address, reply_to, subject, text_body, html_body, headers,
                               tags, last_error, finished_at)
    VALUES (p_account,
            CASE WHEN (erased AND strpos(lower(p_key), lower(addr)) > 0)
                      OR (reply_erased AND strpos(lower(p_key), reply) > 0) THEN NULL
                 ELSE p_key END,
            p_category, CASE WHEN erased THEN 'skipped' ELSE 'queued' END,
            CASE WHEN erased THEN 'erased@erased.invalid' ELSE addr END, btrim(p_from),
            CASE WHEN NOT erased AND NOT coalesce(reply_erased, false) THEN p_reply_to END,
            CASE WHEN erased THEN '(erased)' ELSE p_subject END,
            CASE WHEN erased THEN '' ELSE p_text END, CASE WHEN NOT erased THEN p_html END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_headers, '{}') END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_tags, '{}') END,
            CASE WHEN erased THEN 'contact erased' END,
            CASE WHEN erased THEN clock_timestamp() END)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING m.id, m.status INTO mid, st;
    IF mid IS NOT NULL THEN
        IF st = 'queued' AND p_notify THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names (never renamed) wrap v3 from here on (they NOTIFY, as before).
CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text,
                                               category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- The confirmation of a sign-up, v2: v1 without the NOTIFY (the caller wakes the loops after
-- its commit, pgcast_notify_v2). The message's id (the same id for the same key).
CREATE FUNCTION pgcast_send_confirmation_v2(p_account text, p_to text, p_subject text,
                                            p_text text, p_html text, p_from text,
                                            p_idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(p_account, p_to, p_subject, p_text, p_html, p_from,
                                          p_idempotency_key, 'confirmation',
                                          p_notify => false)
$$;

-- One POST /f/{id} in one statement, v2: pgcast_form_signup_v1 with the confirmation queued
-- by pgcast_send_confirmation_v2 (no NOTIFY: the caller calls pgcast_notify_v2('message')
-- after the commit when message_id is not null). No row when the form does not exist.
CREATE FUNCTION pgcast_signup_v2(p_form uuid, p_email text, p_name text, p_max_mails integer,
                                 p_details jsonb, p_subject text, p_text text, p_html text)
RETURNS TABLE (outcome text, message_id uuid, double_opt_in boolean, redirect_url text,
               embeddable boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    f forms%ROWTYPE;
    mid uuid;
BEGIN
    -- held until commit: a form deleted meanwhile waits (its From is read once, here)
    SELECT * INTO f FROM forms WHERE id = p_form FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_signup_v1(p_form, p_email, p_name, p_max_mails, p_details);
    IF s.outcome = 'mail' THEN
        mid := pgcast_send_confirmation_v2(s.account, p_email, p_subject, p_text, p_html,
                                           f.from_address, 'confirmation:' || s.event_id);
    END IF;
    RETURN QUERY SELECT s.outcome, mid, f.double_opt_in, f.redirect_url, f.embeddable;
END
$$;

-- Wake the workers' loops: {"event": p_event} on pgcast_control ('message': the message
-- loops look for queued messages). Called after the commit that made the work, in a statement
-- of its own (the API makes that statement's commit asynchronous: it writes nothing else).
CREATE FUNCTION pgcast_notify_v2(p_event text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('pgcast_control', json_build_object('event', p_event)::text)
$$;

-- 0027_webhook_batch_record: record many webhook attempts in one statement (issue 30's
-- throughput bar). A worker's deliveries that end while a record is being written are
-- written together by the next one (group commit): each endpoint still has at most one
-- unrecorded delivery (its next POST waits for its record), so order, leases and the crash
-- outcome are those of pgcast_webhook_record_v1, at one statement per batch.

-- record a batch of attempts, one per endpoint, each under the caller's lease on its endpoint.
-- The batch's leased endpoints are locked first, in id order; the successes are delivered and
-- their endpoints' leases extended, set-based; each failure goes through
-- pgcast_webhook_record_v1 (retry with backoff and give the endpoint back, or disable it past
-- p_give_up). Returns one row per delivery recorded: 'delivered', 'retry' or 'disabled'; a
-- delivery without a row was not recorded (the lease was lost: another worker delivers it).
CREATE FUNCTION pgcast_webhook_record_v2(p_endpoints uuid[], p_tokens uuid[],
                                         p_deliveries bigint[], p_ok boolean[],
                                         p_status integer[], p_error text[],
                                         p_latency_ms double precision[], p_response text[],
                                         p_lease interval, p_base interval,
                                         p_give_up interval)
RETURNS TABLE (delivery_id bigint, outcome text)
LANGUAGE plpgsql
-- a batch is a few rows found by primary key: never a plan that scans a table
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
DECLARE
    now_ timestamptz := clock_timestamp();
    held uuid[];
    i integer;
BEGIN
    -- a record lost to a crash only delivers the events again (at least once): no flush
    PERFORM set_config('synchronous_commit', 'off', true);
    held := ARRAY(SELECT e.id
                  FROM unnest(p_endpoints, p_tokens) AS t(endpoint, token)
                  JOIN webhook_endpoints e ON e.id = t.endpoint AND e.lease_token = t.token
                  WHERE e.lease_expires_at > now_
                  ORDER BY e.id
                  FOR NO KEY UPDATE OF e);
    RETURN QUERY
    WITH ok AS (
        SELECT t.endpoint, t.delivery, t.status, t.latency, t.response
        FROM unnest(p_endpoints, p_deliveries, p_ok, p_status, p_latency_ms, p_response)
             AS t(endpoint, delivery, ok, status, latency, response)
        WHERE t.ok AND t.endpoint = ANY (held)
    ), done AS (
        UPDATE webhook_deliveries d
        SET status = 'delivered', attempts = d.attempts + 1, last_attempt_at = now_,
            first_attempt_at = coalesce(d.first_attempt_at, now_),
            last_status = ok.status, last_error = NULL, latency_ms = ok.latency,
            response = left(ok.response, 1024), delivered_at = now_
        FROM ok
        WHERE d.id = ok.delivery AND d.endpoint_id = ok.endpoint AND d.status = 'pending'
        RETURNING d.id, d.endpoint_id
    ), extended AS (
        UPDATE webhook_endpoints e SET lease_expires_at = now_ + p_lease
        WHERE e.id IN (SELECT done.endpoint_id FROM done)
    )
    SELECT done.id, 'delivered'::text FROM done;
    FOR i IN 1 .. coalesce(cardinality(p_ok), 0) LOOP
        IF NOT p_ok[i] AND p_endpoints[i] = ANY (held) THEN
            delivery_id := p_deliveries[i];
            outcome := pgcast_webhook_record_v1(p_endpoints[i], p_tokens[i], p_deliveries[i],
                                                false, p_status[i], p_error[i],
                                                p_latency_ms[i], p_response[i], p_lease,
                                                p_base, p_give_up);
            IF outcome IS NOT NULL THEN
                RETURN NEXT;
            END IF;
        END IF;
    END LOOP;
END
$$;

-- 0028_record_one_pass (issue 32, the database cost per recipient): the record in one pass.
--
-- record, v6: v5's outcomes, counters, late answers and audit, with the group's rows locked
-- and updated by ONE statement instead of a `SELECT … ORDER BY … FOR UPDATE` pass followed by
-- an UPDATE of the same rows (measured, bench.profile_db at 200,000: the record was 49 % of
-- pgcast's statement time, and its lock pass wrote 1.5 Heap/LOCK WAL records per recipient
-- that the floor does not write).
-- * Lock order (DESIGN): the broadcast row first, as in v5, then the recipient rows in
--   contact_id order. The UPDATE joins the outcomes to the rows with a MERGE join only (hash
--   and nested-loop joins are off for this function): a merge join's output is in the order
--   of its key whatever the access path and the statistics, so the rows are locked in
--   contact_id order, as renew (which locks a claim's rows in that order without the
--   broadcast row) expects.
-- * The rows the claim still holds (claim_token = p_token, sending or unknown) are selected
--   by the UPDATE itself: a row changed meanwhile is re-checked by Postgres on its newest
--   version after the lock wait (EvalPlanQual), as v5's lock pass re-checked it.
-- * The rows it no longer holds (late answers) are read and locked only when the UPDATE did
--   not take the whole group (rare: a retry requeued them while the call was out): the late
--   path is v5's, on those rows alone.
-- * How many of the group's rows the sweeper had counted unknown is read only when the
--   broadcast's `unknown` counter, read under its row lock, is not 0 (the counter equals
--   count(*) of its unknown rows, and every writer that makes a row unknown or takes it out
--   of unknown holds the broadcast row, which this function holds first).
CREATE FUNCTION pgcast_record_v6(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
                                 p_message_ids text[], p_errors text[], p_retry_in double precision[],
                                 p_breaker integer)
RETURNS TABLE (recorded integer, tripped boolean)
LANGUAGE plpgsql
SET enable_nestloop = off
SET enable_hashjoin = off
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    n_unknown integer;
    was_unknown integer := 0;
    late bigint[] := '{}';
    late_status jsonb := '{}';
    applied bigint[] := '{}';
    c record;
    streak integer;
    st text;
    is_cancelled boolean;
    is_finished boolean;
BEGIN
    -- as v5: not worth an fsync (a record lost to a crash leaves its rows sending, and the
    -- sweeper turns them unknown: never re-sent); the handoff stays synchronous
    PERFORM set_config('synchronous_commit', 'off', true);
    SELECT b.status, b.unknown INTO st, n_unknown FROM broadcasts b WHERE b.id = p_id
    FOR NO KEY UPDATE;
    is_cancelled := st = 'cancelled';
    is_finished := st IN ('sent', 'failed');
    IF n_unknown > 0 THEN
        -- stable: what turns a row unknown or takes it out holds the broadcast row
        SELECT count(*) INTO was_unknown FROM broadcast_recipients r
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids) AND r.claim_token = p_token
          AND r.status = 'unknown';
    END IF;
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
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids)
          AND r.contact_id = res.contact_id
          AND r.claim_token = p_token AND r.status IN ('sending', 'unknown')
        RETURNING r.contact_id, res.outcome, r.status
    )
    SELECT count(*) AS n,
           count(*) FILTER (WHERE u.status = 'sent') AS n_sent,
           count(*) FILTER (WHERE u.status = 'failed') AS n_failed,
           count(*) FILTER (WHERE u.status = 'unknown') AS n_unknown,
           count(*) FILTER (WHERE u.outcome IN ('retry', 'failed')) AS n_bad,
           count(*) FILTER (WHERE u.status = 'cancelled') AS n_cancelled,
           coalesce(array_agg(u.contact_id), '{}') AS ids
    INTO c FROM upd u;
    IF c.n < cardinality(p_ids) THEN
        -- the group's rows this claim no longer holds, locked in contact_id order (rows of
        -- other claims: their own workers never take this claim's rows)
        SELECT coalesce(array_agg(l.contact_id), '{}'),
               coalesce(jsonb_object_agg(l.contact_id::text, l.status), '{}')
        INTO late, late_status
        FROM (SELECT r.contact_id, r.status FROM broadcast_recipients r
              WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids)
                AND NOT (r.contact_id = ANY (c.ids))
              ORDER BY r.contact_id
              FOR UPDATE) l;
    END IF;
    IF cardinality(late) > 0 THEN
        -- a late `sent` for a requeued row nobody has claimed again: recorded, not re-sent
        WITH upd AS (
            UPDATE broadcast_recipients r
            SET status = 'sent', attempts = r.attempts + 1, provider_message_id = res.message_id,
                last_error = NULL, sent_at = now(), retry_at = NULL, lease_expires_at = NULL
            FROM unnest(p_ids, p_outcomes, p_message_ids)
                AS res(contact_id, outcome, message_id)
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (late)
              AND r.contact_id = res.contact_id AND res.outcome = 'sent'
              AND r.status = 'pending' AND r.claim_token = p_token
              AND st IN ('sending', 'paused')
            RETURNING r.contact_id
        )
        SELECT coalesce(array_agg(u.contact_id), '{}') INTO applied FROM upd u;
    END IF;
    UPDATE broadcasts
    SET sent = sent + c.n_sent + cardinality(applied), failed = failed + c.n_failed,
        -- a late answer that says sent: the broadcast did reach somebody after all
        status = CASE WHEN status = 'failed' AND c.n_sent > 0 THEN 'sent' ELSE status END,
        audit_log = audit_log
            || CASE WHEN status = 'failed' AND c.n_sent > 0
                    THEN pgcast_audit_v1('late_sent', 'failed', 'sent',
                                         jsonb_build_object('sent', c.n_sent))
                    ELSE '[]'::jsonb END
            || CASE WHEN cardinality(late) > 0
                    THEN pgcast_audit_v1('late_answer', status, status, jsonb_build_object(
                        'claim_token', p_token,
                        'answers', (SELECT jsonb_agg(jsonb_build_object(
                                        'contact_id', res.contact_id, 'outcome', res.outcome,
                                        'provider_message_id', res.message_id,
                                        'row_status', late_status ->> res.contact_id::text,
                                        'recorded', res.contact_id = ANY (applied))
                                        ORDER BY res.contact_id)
                                    FROM unnest(p_ids, p_outcomes, p_message_ids)
                                        AS res(contact_id, outcome, message_id)
                                    WHERE res.contact_id = ANY (late))))
                    ELSE '[]'::jsonb END,
        unknown = unknown + c.n_unknown - was_unknown, cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN c.n_sent + cardinality(applied) > 0 THEN 0
                              ELSE failure_streak + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT (c.n + cardinality(applied))::integer, p_breaker > 0 AND streak > p_breaker;
END
$$;

-- 0029_bulk_rendering_failure (issue 32, SendBulkEmail): a Rendering Failure event fails the
-- `sent` row of its message.
--
-- By SendBulkEmail, SES answers SUCCESS with a message id and renders the entry from its
-- inline template afterwards; an entry it cannot render is reported by a Rendering Failure
-- event of that message id, and nothing was delivered. v2 resolves only an `unknown` row from
-- such an event; v3 is v2, and for a Rendering Failure naming a row that is `sent` with that
-- provider message id: the row becomes `failed` (last_error 'SES renderingfailure: …',
-- sent_at cleared, the message id kept), the broadcast's `sent` - 1 and `failed` + 1 in the
-- same transaction, one `rendering_failure` audit entry. An event SNS delivers again, or for
-- a row in any other state or with another message id, changes nothing more. Lock order: the
-- broadcast row, then the recipient row (pgcast_reconcile_event_v1's). Returns v2's columns;
-- `reconciled` is 'failed' when a sent row was failed.
CREATE FUNCTION pgcast_ses_event_v3(p_message_id text, p_topic text, p_sns_at timestamptz,
                                    p_prune_before timestamptz, p_event text, p_broadcast uuid,
                                    p_contact bigint, p_addresses text[], p_detail text,
                                    p_at timestamptz, p_soft_limit integer, p_guard_min integer,
                                    p_max_bounce double precision,
                                    p_max_complaint double precision, p_ses_message_id text)
RETURNS TABLE (outcome text, broadcast_id uuid, n_contacts integer, guard text,
               reconciled text)
LANGUAGE plpgsql AS $$
DECLARE
    v record;
    failed_now text;
BEGIN
    -- v2 pins synchronous_commit on: the webhook answers 200 once this commits
    SELECT * INTO v FROM pgcast_ses_event_v2(p_message_id, p_topic, p_sns_at, p_prune_before,
        p_event, p_broadcast, p_contact, p_addresses, p_detail, p_at, p_soft_limit,
        p_guard_min, p_max_bounce, p_max_complaint, p_ses_message_id);
    failed_now := v.reconciled;
    IF v.reconciled IS NULL AND v.outcome IS DISTINCT FROM 'duplicate'
            AND p_event = 'renderingfailure' AND p_broadcast IS NOT NULL
            AND p_contact IS NOT NULL AND p_ses_message_id IS NOT NULL THEN
        PERFORM 1 FROM broadcasts b WHERE b.id = p_broadcast FOR NO KEY UPDATE;
        IF FOUND THEN
            UPDATE broadcast_recipients r
            SET status = 'failed', sent_at = NULL,
                last_error = left('SES renderingfailure' || coalesce(': ' || p_detail, ''),
                                  500)
            WHERE r.broadcast_id = p_broadcast AND r.contact_id = p_contact
              AND r.status = 'sent' AND r.provider_message_id = p_ses_message_id;
            IF FOUND THEN
                UPDATE broadcasts AS u
                SET sent = u.sent - 1, failed = u.failed + 1, updated_at = now(),
                    audit_log = u.audit_log || pgcast_audit_v1('rendering_failure', u.status,
                        u.status, jsonb_build_object('contact', p_contact,
                                                     'message_id', p_ses_message_id,
                                                     'detail', p_detail))
                WHERE u.id = p_broadcast;
                failed_now := 'failed';
            END IF;
        END IF;
    END IF;
    RETURN QUERY SELECT v.outcome, v.broadcast_id, v.n_contacts, v.guard, failed_now;
END
$$;

-- 0030_claim_columns (issue 32, the worker's CPU per recipient): claim only the columns the
-- content reads.
--
-- claim and hand off, v6, and hand off, v4: v5's and v3's fences, rows and order unchanged,
-- with one more argument, p_contact: false returns the contact's attributes and tags as NULL
-- (a content whose templates never read `contact`: measured, psycopg decoding each row's
-- jsonb attributes and text[] tags was about a fifth of a null-provider worker's samples).
-- The name and the address are returned either way (the To header).

CREATE FUNCTION pgcast_handoff_v4(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[],
                                  p_contact boolean)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[])
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
    -- the contacts fence (exclusive in every writer of the columns the predicate reads)
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    gone := ARRAY(
        SELECT x.id FROM unnest(p_ids) AS x(id) LEFT JOIN contacts k ON k.id = x.id
        WHERE k.id IS NULL OR NOT pgcast_mailable(k));
    IF cardinality(gone) > 0 THEN
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    locked := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND l.lease_expires_at > clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(gone) > 0 THEN
        UPDATE broadcast_recipients r
        SET status = 'skipped', lease_expires_at = NULL,
            last_error = coalesce((SELECT pgcast_unmailable_reason_v1(k) FROM contacts k
                                   WHERE k.id = r.contact_id), 'contact erased')
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
    RETURNING r.contact_id, r.email, c.name, CASE WHEN p_contact THEN c.attributes END,
              CASE WHEN p_contact THEN c.tags END;
END
$$;

CREATE FUNCTION pgcast_claim_handoff_v6(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint,
                                        p_contact boolean)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint,
               global_rate double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
    lim double precision;
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
    lim := coalesce((SELECT l.rate FROM rate_limits l WHERE l.name = 'global'), 0);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable AND lim = 0 THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable AND lim = 0 THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name,
                 CASE WHEN p_contact THEN coalesce(ct.attributes, '{}') END AS attributes,
                 CASE WHEN p_contact THEN coalesce(ct.tags, '{}') END AS tags,
                 ct.id IS NOT NULL AND pgcast_mailable(ct) AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e,
              k.mailable AND lim = 0, c.last_fresh, lim;
END
$$;

-- 0032_erase_gaps: gaps the team documented and left open around the erase.
-- * pgcast_send_message inside a caller's transaction deadlocked with an erase when the
--   caller had touched pgcast's contacts first (docs/messages.md): pgcast_erase_v6 waited for
--   the erased contact's row and the account's contacts fence while it held the erasure lock
--   (exclusive), and the caller, holding that row or that fence, then waited for the erasure
--   lock (shared). pgcast_erase_v7 never waits long while it holds something: it takes the
--   erasure lock (waiting for it holding nothing), then waits at most 100 ms in all (half of
--   deadlock_timeout, if less) for the contact row, the fence and the rows of the broadcasts
--   and saved segments it rewrites; past that, it lets everything go (the rollback of a
--   block), waits for the one that was busy holding nothing, lets it go and starts again; a
--   deadlock Postgres resolves against it while it rewrites rolls it back and starts it again.
--   A caller's lock_timeout bounds the erase's whole wait (SQLSTATE 55P03), so an API request
--   never waits longer than it said.
-- * An erase left the address in filters: a saved segment, a draft's or scheduled broadcast's
--   filter, a sent broadcast's filter_used and the send's audit entry can hold it as a value
--   (`{"attribute": "referrer", "eq": "ann@example.com"}`). v7 rewrites each condition that
--   names the address (pgcast_segment_scrub_v1) so that the address is gone and the value
--   selects nobody, and records it in the audit log of the segment (a new column) or of the
--   broadcast.

-- Each condition of a filter that names p_addr (a lower-case address; a text without @ names
-- nothing) in a string value, or as an attribute's name (ignoring case, anywhere in the
-- string), rewritten as if its value
-- were one no contact has: `in` loses the values that name it ({"any": []} when none is left),
-- `ne` becomes {"not": {"any": []}} (everyone), any other condition {"any": []} (nobody).
-- all, any and not are rewritten inside; everything else is returned as it is.
CREATE FUNCTION pgcast_segment_scrub_v1(p_filter jsonb, p_addr text)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text;
    kept jsonb;
BEGIN
    IF p_filter IS NULL OR jsonb_typeof(p_filter) <> 'object'
       OR strpos(coalesce(p_addr, ''), '@') = 0 THEN
        RETURN p_filter;
    END IF;
    FOREACH k IN ARRAY ARRAY['all', 'any'] LOOP
        IF p_filter ? k AND jsonb_typeof(p_filter -> k) = 'array' THEN
            RETURN p_filter || jsonb_build_object(k, coalesce(
                (SELECT jsonb_agg(pgcast_segment_scrub_v1(e, p_addr) ORDER BY i)
                 FROM jsonb_array_elements(p_filter -> k) WITH ORDINALITY AS t(e, i)),
                '[]'::jsonb));
        END IF;
    END LOOP;
    IF p_filter ? 'not' THEN
        RETURN p_filter || jsonb_build_object('not',
                                              pgcast_segment_scrub_v1(p_filter -> 'not', p_addr));
    END IF;
    -- a condition: does any of its strings name the address?
    IF NOT EXISTS (SELECT 1 FROM jsonb_path_query(p_filter, 'strict $.**') AS v
                   WHERE jsonb_typeof(v) = 'string' AND strpos(lower(v #>> '{}'), p_addr) > 0)
    THEN
        RETURN p_filter;
    END IF;
    IF strpos(lower(coalesce(p_filter ->> 'attribute', '')), p_addr) = 0 THEN
        IF jsonb_typeof(p_filter -> 'in') = 'array' THEN
            kept := coalesce((SELECT jsonb_agg(e ORDER BY i)
                              FROM jsonb_array_elements(p_filter -> 'in')
                                   WITH ORDINALITY AS t(e, i)
                              WHERE jsonb_typeof(e) <> 'string'
                                 OR strpos(lower(e #>> '{}'), p_addr) = 0), '[]'::jsonb);
            IF jsonb_array_length(kept) > 0 THEN
                RETURN p_filter || jsonb_build_object('in', kept);
            END IF;
        ELSIF p_filter ? 'ne' THEN
            RETURN '{"not": {"any": []}}'::jsonb;
        END IF;
    END IF;
    RETURN '{"any": []}'::jsonb;
END
$$;

ALTER TABLE segments ADD COLUMN audit_log jsonb NOT NULL DEFAULT '[]';

-- erase, v7: v6 (v3's scrub, the messages, opens and clicks) after taking, in this order, the
-- erasure lock (exclusive), the contact row, the contacts fence (v3's locks), then the rows of
-- the account's broadcasts whose audit log or filters name the address (in id order) and of
-- its saved segments whose filter names it (in name order), waiting for them at most 100 ms in
-- all (or half of deadlock_timeout) while it holds the erasure lock; past that it lets every
-- one go, waits for the busy one holding nothing, and starts again. After v6, the filters:
-- each saved segment and broadcast whose segment_filter, filter_used or a send's audit entry
-- (details.filter) names the address (a text with @) is rewritten (pgcast_segment_scrub_v1)
-- and gets an audit entry {"action": "erase", "details": {"scrubbed": [the columns],
-- "source", the actor}} (never the address). If Postgres picks it in a deadlock while it
-- rewrites (another row it rewrites, held by a transaction that then waits for the erasure
-- lock), all it did is rolled back and it starts again. segments: how many saved segments
-- were rewritten. The caller's lock_timeout, when set, bounds the whole wait for those locks
-- (SQLSTATE 55P03).
CREATE FUNCTION pgcast_erase_v7(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint, segments bigint)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := lower(btrim(p_email));
    -- only an address is looked for in filters (strpos: a short text would match everywhere)
    is_address boolean := strpos(lower(btrim(p_email)), '@') > 0;
    caller_timeout text := current_setting('lock_timeout');
    deadline timestamptz;
    budget interval := least(interval '100 ms',
                             current_setting('deadlock_timeout')::interval / 2);
    holding_until timestamptz;
    busy text;
    cid bigint;
    v record;
    seg bigint;
    ids uuid[];
    entry jsonb;
BEGIN
    IF caller_timeout::interval > interval '0' THEN
        deadline := clock_timestamp() + caller_timeout::interval;
    END IF;
    LOOP
        IF busy IS NOT NULL AND deadline IS NOT NULL AND clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'the erase waited lock_timeout (%) for a lock (%)',
                caller_timeout, busy USING ERRCODE = 'lock_not_available';
        END IF;
        IF busy IS NOT NULL AND busy <> 'rewrite' THEN
            -- wait, holding nothing, until what was busy is free; the block's rollback lets it
            -- go again (after a deadlock of the rewrite: straight back to the erasure lock)
            BEGIN
                PERFORM set_config('lock_timeout', CASE WHEN deadline IS NULL THEN '0'
                    ELSE greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp())
                                          * 1000))::text || 'ms' END, true);
                IF busy = 'contact row' THEN
                    PERFORM 1 FROM contacts c
                    WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
                ELSIF busy = 'contacts fence' THEN
                    PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'),
                                                  hashtext(p_account));
                ELSIF busy = 'broadcast rows' THEN
                    PERFORM 1 FROM broadcasts b
                    WHERE b.account = p_account
                      AND ((strpos(lower(b.audit_log::text), addr) > 0
                            AND (b.audit_log @> '[{"action": "test"}]' OR is_address))
                           OR (is_address AND (strpos(lower(b.segment_filter::text), addr) > 0
                               OR strpos(lower(b.filter_used::text), addr) > 0)))
                    ORDER BY b.id FOR UPDATE;
                ELSE
                    PERFORM 1 FROM segments s
                    WHERE s.account = p_account
                      AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter
                    ORDER BY s.name FOR UPDATE;
                END IF;
                RAISE EXCEPTION 'let go' USING ERRCODE = 'PGC01';
            EXCEPTION WHEN SQLSTATE 'PGC01' THEN
                NULL;
            END;
        END IF;
        BEGIN
            busy := 'erasure lock';
            PERFORM set_config('lock_timeout', CASE WHEN deadline IS NULL THEN '0'
                ELSE greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp())
                                      * 1000))::text || 'ms' END, true);
            PERFORM pg_advisory_xact_lock(hashtext('pgcast.erasure'), hashtext(p_account));
            -- held: the erasure lock; from here on, waits of `budget` in all
            holding_until := clock_timestamp() + budget;
            IF deadline IS NOT NULL THEN
                holding_until := least(holding_until, deadline);
            END IF;
            busy := 'contact row';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            SELECT c.id INTO cid FROM contacts c
            WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
            IF cid IS NOT NULL THEN
                busy := 'contacts fence';
                PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                    holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
                PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(p_account));
            END IF;
            busy := 'broadcast rows';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            ids := ARRAY(SELECT b.id FROM broadcasts b
                         WHERE b.account = p_account
                           AND ((strpos(lower(b.audit_log::text), addr) > 0
                                 AND (b.audit_log @> '[{"action": "test"}]' OR is_address))
                                OR (is_address
                                    AND (strpos(lower(b.segment_filter::text), addr) > 0
                                         OR strpos(lower(b.filter_used::text), addr) > 0)))
                         ORDER BY b.id FOR UPDATE);
            busy := 'segment rows';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            PERFORM 1 FROM segments s
            WHERE s.account = p_account
              AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter
            ORDER BY s.name FOR UPDATE;
            busy := 'rewrite';
            PERFORM set_config('lock_timeout', caller_timeout, true);
            -- held: v3's three locks (v3 takes them again without waiting) and the rows
            -- rewritten below; a deadlock from here on rolls it all back and starts again
            SELECT * INTO v FROM pgcast_erase_v6(p_account, p_email, p_source, p_actor);
            entry := pgcast_audit_v1('erase', NULL, NULL, coalesce(p_actor, '{}'::jsonb)
                                     || jsonb_build_object('source', p_source));
            -- saved segments
            UPDATE segments s
            SET filter = pgcast_segment_scrub_v1(s.filter, addr),
                audit_log = s.audit_log
                    || jsonb_set(entry, '{0,details,scrubbed}', '["filter"]')
            WHERE s.account = p_account
              AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter;
            GET DIAGNOSTICS seg = ROW_COUNT;
            -- broadcasts: the filter of a draft or a scheduled one, the filter a send
            -- evaluated and its copy in the audit entries
            WITH scrubbed AS (
                SELECT b.id,
                       pgcast_segment_scrub_v1(b.segment_filter, addr) AS segment_filter,
                       pgcast_segment_scrub_v1(b.filter_used, addr) AS filter_used,
                       (SELECT jsonb_agg(
                                   CASE WHEN jsonb_typeof(a.e -> 'details' -> 'filter') = 'object'
                                        THEN jsonb_set(a.e, '{details,filter}',
                                                       pgcast_segment_scrub_v1(
                                                           a.e -> 'details' -> 'filter', addr))
                                        ELSE a.e END ORDER BY a.i)
                        FROM jsonb_array_elements(b.audit_log) WITH ORDINALITY AS a(e, i))
                           AS audit_log
                FROM broadcasts b WHERE b.id = ANY (ids)
            ), changed AS (
                SELECT s.*, array_remove(ARRAY[
                           CASE WHEN s.segment_filter IS DISTINCT FROM b.segment_filter
                                THEN 'segment_filter' END,
                           CASE WHEN s.filter_used IS DISTINCT FROM b.filter_used
                                THEN 'filter_used' END,
                           CASE WHEN s.audit_log IS DISTINCT FROM b.audit_log
                                THEN 'audit_log' END], NULL) AS what
                FROM scrubbed s JOIN broadcasts b ON b.id = s.id
            )
            UPDATE broadcasts b
            SET segment_filter = c.segment_filter, filter_used = c.filter_used,
                audit_log = coalesce(c.audit_log, '[]'::jsonb)
                    || jsonb_set(jsonb_set(jsonb_set(entry, '{0,from}', to_jsonb(b.status)),
                                           '{0,to}', to_jsonb(b.status)),
                                 '{0,details,scrubbed}', to_jsonb(c.what))
            FROM changed c
            WHERE b.id = c.id AND cardinality(c.what) > 0;
            busy := NULL;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            -- a short wait ran out (or Postgres chose this erase in a deadlock of its
            -- rewrite): everything taken and done in the block is rolled back
            IF busy = 'erasure lock' OR (busy = 'rewrite' AND SQLSTATE = '55P03') THEN
                RAISE;
            END IF;
        END;
        EXIT WHEN busy IS NULL;
    END LOOP;
    RETURN QUERY SELECT v.contact_id, v.recipients, v.messages, seg;
END
$$;

-- 0034_own_bucket_batches: a broadcast's own limit (`rate_limit`) is taken in batches.
-- Under its own bucket a broadcast was taken, handed off and recorded about one recipient at a
-- time: each worker process's taker woke when the next token was due (plus 25 ms of gather),
-- and with two processes taking turns each take found one or two tokens. At 100/s that was
-- some 90 handoffs and 90 records a second (each a synchronous commit) and twice as many
-- takes, beside the application's own traffic on the same database (issue 28's sign-ups).
-- pgcast_take_own_v1 grants nothing until the bucket holds half its burst (at least one, and
-- never more than asked for), and says how long until it will: every take then carries about
-- half a burst (5 at 100/s, whose burst is rate / 10), however many processes of this version
-- take. The rate is the same: the wait ends while the bucket still has half its burst of room,
-- so a wake-up up to that late (50 ms at 20/s and more) loses no refill; with a burst of one
-- (10/s and less) the batch is the whole bucket, as it was. An empty take writes nothing. Like the other takes it commits
-- asynchronously under the bucket's rate lock (a grant is made durable by the handoff's
-- synchronous commit that follows it), so it serialises with v5's takes of the same bucket
-- from a process not yet upgraded.
CREATE FUNCTION pgcast_take_own_v1(p_name text, p_want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    need double precision;
    g integer;
BEGIN
    IF p_want IS NULL OR p_want <= 0 THEN
        RETURN QUERY SELECT 0, 0.0::double precision;  -- nothing asked, nothing taken
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    need := least(p_want, greatest(1, floor(b.burst / 2)));
    IF have < need THEN
        RETURN QUERY SELECT 0, (need - have) / b.rate;
        RETURN;
    END IF;
    -- floor before the cast: a burst beyond an integer's range must not fail the take
    g := floor(least(p_want::double precision, have))::integer;
    UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
    RETURN QUERY SELECT g, 0.0::double precision;
END
$$;

-- 0035_erased_cached_plan: pgcast_erased_v1 keeps its plan.
-- A sign-up asks it four times (the sign-up, the message's address and reply-to, the message's
-- handoff), and as a SQL function whose body holds a subquery it is never inlined: Postgres
-- parsed and planned its body again in every statement that called it, some 0.1 ms a call on
-- a busy server, the largest single cost of a sign-up in bench.signup. In plpgsql its plan is
-- kept for the session; pinned generic, because a caller's plan_cache_mode reaches the
-- functions it calls (pgcast_message_handoff_v2 forces custom plans, for which this body
-- would be planned again for every message). Same arguments, same answer (a NULL address is
-- erased nowhere), so callers of every version keep calling it: this replaces the body in
-- place, the one time a shipped function is edited, because the alternative was a new version
-- of each of its six callers for no change of meaning.
CREATE OR REPLACE FUNCTION pgcast_erased_v1(p_account text, p_address text)
RETURNS boolean LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                   WHERE e.account = p_account
                     AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                         convert_to(lower(btrim(p_address)), 'UTF8')))));
END
$$;
-- 0036_record_finals_first (issue 32, the database cost per recipient): a group's final answers
-- are written before the broadcast row is locked.
--
-- record, v7: v6's outcomes, counters, late answers and audit, in two steps.
-- * Measured (bench.drain --profile, 500,000 recipients, two workers): v6 locked the broadcast
--   row first and held it through its 500-row UPDATE until commit, so the records of every
--   loop on every worker took turns on that one row: 19 % of the sampled backends were records
--   waiting for it at two loops a worker, 43 % at the default four.
-- * Step 1, without the broadcast row: the rows this claim still holds (`sending`, its
--   claim_token) whose answer is final (sent, failed, unknown) are written. What such a row
--   becomes does not depend on the broadcast's status (v6 wrote the same whatever it read),
--   so nothing needs the status stable while they are written. Left to step 2: rows whose
--   lease ends within a second (the sweeper may be about to take them: it holds the
--   broadcast row while it locks expired rows), rows `unknown` (the sweeper's count of them
--   is read under the broadcast row), rows the claim no longer holds, and non-final answers
--   (retry, throttled, release: what they become depends on the status).
-- * Step 2: the broadcast row FOR NO KEY UPDATE, then v6's path for what step 1 left (none,
--   in a drain without errors), then the counters of both steps, in the same transaction as
--   the rows (invariant 6: counters equal rows at every commit).
-- * Lock order: step 1 takes recipient rows before the broadcast row, the one exception to
--   DESIGN's order. Writers that hold the broadcast row and lock recipient rows touch rows
--   step 1 never holds (cancel: pending and claimed; pause and handoff: claimed; unhandoff:
--   a claim whose call was never made; the sweeper: leases already ended, and step 1 leaves
--   leases that end within a second; retry, requeue and the SES events: rows already final;
--   a record's late pass, below: only rows under its own token, reading the others without
--   a lock). A lease renewal passes over rows others hold (renew v4, below). Left: an erase,
--   which rewrites every row of the contact after locking the broadcasts whose filters or
--   test sends name the address, and a sweep after the record stalled past a lease. Postgres
--   ends such a deadlock by rolling one side back. If it is the record, step 1 runs in a
--   block whose rollback lets its rows go, and the record is then done as v6 does it, the
--   broadcast row first. If it is the erase, its block rolls back and it starts its rewrite
--   again; a sweep runs again at its next tick.
CREATE FUNCTION pgcast_record_v7(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
                                 p_message_ids text[], p_errors text[], p_retry_in double precision[],
                                 p_breaker integer)
RETURNS TABLE (recorded integer, tripped boolean)
LANGUAGE plpgsql
SET enable_nestloop = off
SET enable_hashjoin = off
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    f record;
    rest bigint[] := '{}';
    n_unknown integer;
    was_unknown integer := 0;
    late bigint[] := '{}';
    late_status jsonb := '{}';
    applied bigint[] := '{}';
    c record;
    streak integer;
    st text;
    is_cancelled boolean;
    is_finished boolean;
BEGIN
    -- as v6: not worth an fsync (a record lost to a crash leaves its rows sending, and the
    -- sweeper turns them unknown: never re-sent); the handoff stays synchronous
    PERFORM set_config('synchronous_commit', 'off', true);
    BEGIN
        WITH upd AS (
            UPDATE broadcast_recipients r
            SET status = res.outcome, attempts = r.attempts + 1,
                provider_message_id = res.message_id, last_error = res.error,
                sent_at = CASE WHEN res.outcome = 'sent' THEN now() END,
                lease_expires_at = NULL
            FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors)
                AS res(contact_id, outcome, message_id, error)
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids)
              AND r.contact_id = res.contact_id AND res.outcome IN ('sent', 'failed', 'unknown')
              AND r.claim_token = p_token AND r.status = 'sending'
              AND r.lease_expires_at > clock_timestamp() + interval '1 second'
            RETURNING r.contact_id, r.status
        )
        SELECT count(*) AS n,
               count(*) FILTER (WHERE u.status = 'sent') AS n_sent,
               count(*) FILTER (WHERE u.status = 'failed') AS n_failed,
               count(*) FILTER (WHERE u.status = 'unknown') AS n_unknown,
               coalesce(array_agg(u.contact_id), '{}') AS ids
        INTO f FROM upd u;
        SELECT b.status, b.unknown INTO st, n_unknown FROM broadcasts b WHERE b.id = p_id
        FOR NO KEY UPDATE;
    EXCEPTION WHEN deadlock_detected THEN
        -- step 1 is rolled back: the whole group the v6 way, the broadcast row first
        SELECT 0::bigint AS n, 0::bigint AS n_sent, 0::bigint AS n_failed, 0::bigint AS n_unknown,
               '{}'::bigint[] AS ids
        INTO f;
        SELECT b.status, b.unknown INTO st, n_unknown FROM broadcasts b WHERE b.id = p_id
        FOR NO KEY UPDATE;
    END;
    is_cancelled := st = 'cancelled';
    is_finished := st IN ('sent', 'failed');
    -- bigint, as count(*): a record's field keeps the type its first assignment planned with
    SELECT 0::bigint AS n, 0::bigint AS n_sent, 0::bigint AS n_failed, 0::bigint AS n_unknown,
           0::bigint AS n_bad, 0::bigint AS n_cancelled, '{}'::bigint[] AS ids
    INTO c;
    IF f.n < cardinality(p_ids) THEN
        rest := ARRAY(SELECT unnest(p_ids) EXCEPT SELECT unnest(f.ids::bigint[]));
        IF n_unknown > 0 THEN
            -- stable: what turns a row unknown or takes it out holds the broadcast row
            SELECT count(*) INTO was_unknown FROM broadcast_recipients r
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (rest) AND r.claim_token = p_token
              AND r.status = 'unknown';
        END IF;
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
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (rest)
              AND r.contact_id = res.contact_id
              AND r.claim_token = p_token AND r.status IN ('sending', 'unknown')
            RETURNING r.contact_id, res.outcome, r.status
        )
        SELECT count(*) AS n,
               count(*) FILTER (WHERE u.status = 'sent') AS n_sent,
               count(*) FILTER (WHERE u.status = 'failed') AS n_failed,
               count(*) FILTER (WHERE u.status = 'unknown') AS n_unknown,
               count(*) FILTER (WHERE u.outcome IN ('retry', 'failed')) AS n_bad,
               count(*) FILTER (WHERE u.status = 'cancelled') AS n_cancelled,
               coalesce(array_agg(u.contact_id), '{}') AS ids
        INTO c FROM upd u;
        IF c.n < cardinality(rest) THEN
            -- the group's rows this claim no longer holds. Locked, in contact_id order, only
            -- those still under its token, the only ones it may write (a `sent` answer for a
            -- requeued row nobody has claimed since); the others are another claim's now, and
            -- that claim's record may hold them while it waits for the broadcast row, which
            -- this one holds: they are read for the audit without a lock (v6 locked them)
            SELECT coalesce(array_agg(l.contact_id), '{}'),
                   coalesce(jsonb_object_agg(l.contact_id::text, l.status), '{}')
            INTO late, late_status
            FROM (SELECT r.contact_id, r.status FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.contact_id = ANY (rest)
                    AND NOT (r.contact_id = ANY (c.ids)) AND r.claim_token = p_token
                  ORDER BY r.contact_id
                  FOR UPDATE) l;
            SELECT late || coalesce(array_agg(o.contact_id), '{}'),
                   late_status || coalesce(jsonb_object_agg(o.contact_id::text, o.status), '{}')
            INTO late, late_status
            FROM broadcast_recipients o
            WHERE o.broadcast_id = p_id AND o.contact_id = ANY (rest)
              AND NOT (o.contact_id = ANY (c.ids)) AND o.claim_token IS DISTINCT FROM p_token;
        END IF;
    END IF;
    IF cardinality(late) > 0 THEN
        -- a late `sent` for a requeued row nobody has claimed again: recorded, not re-sent
        WITH upd AS (
            UPDATE broadcast_recipients r
            SET status = 'sent', attempts = r.attempts + 1, provider_message_id = res.message_id,
                last_error = NULL, sent_at = now(), retry_at = NULL, lease_expires_at = NULL
            FROM unnest(p_ids, p_outcomes, p_message_ids)
                AS res(contact_id, outcome, message_id)
            WHERE r.broadcast_id = p_id AND r.contact_id = ANY (late)
              AND r.contact_id = res.contact_id AND res.outcome = 'sent'
              AND r.status = 'pending' AND r.claim_token = p_token
              AND st IN ('sending', 'paused')
            RETURNING r.contact_id
        )
        SELECT coalesce(array_agg(u.contact_id), '{}') INTO applied FROM upd u;
    END IF;
    UPDATE broadcasts
    SET sent = sent + f.n_sent + c.n_sent + cardinality(applied),
        failed = failed + f.n_failed + c.n_failed,
        -- a late answer that says sent: the broadcast did reach somebody after all
        status = CASE WHEN status = 'failed' AND f.n_sent + c.n_sent > 0 THEN 'sent'
                      ELSE status END,
        audit_log = audit_log
            || CASE WHEN status = 'failed' AND f.n_sent + c.n_sent > 0
                    THEN pgcast_audit_v1('late_sent', 'failed', 'sent',
                                         jsonb_build_object('sent', f.n_sent + c.n_sent))
                    ELSE '[]'::jsonb END
            || CASE WHEN cardinality(late) > 0
                    THEN pgcast_audit_v1('late_answer', status, status, jsonb_build_object(
                        'claim_token', p_token,
                        'answers', (SELECT jsonb_agg(jsonb_build_object(
                                        'contact_id', res.contact_id, 'outcome', res.outcome,
                                        'provider_message_id', res.message_id,
                                        'row_status', late_status ->> res.contact_id::text,
                                        'recorded', res.contact_id = ANY (applied))
                                        ORDER BY res.contact_id)
                                    FROM unnest(p_ids, p_outcomes, p_message_ids)
                                        AS res(contact_id, outcome, message_id)
                                    WHERE res.contact_id = ANY (late))))
                    ELSE '[]'::jsonb END,
        unknown = unknown + f.n_unknown + c.n_unknown - was_unknown,
        cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN f.n_sent + c.n_sent + cardinality(applied) > 0 THEN 0
                              ELSE failure_streak + f.n_failed + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT (f.n + c.n + cardinality(applied))::integer,
                        p_breaker > 0 AND streak > p_breaker;
END
$$;

-- renew, v4: v3 with the claims' rows taken FOR UPDATE SKIP LOCKED, so a renewal never waits
-- for a row. With record v7 a renewal could otherwise close a cycle: it holds the rows of one
-- claim (sorted pass) and waits for rows of another that a record's first step holds, while
-- that record waits for the broadcast row, held by a handoff, cancel or pause that waits for
-- the rows the renewal holds. A row skipped is held by a transaction that is about to change
-- it (a record or a handoff of this worker, a cancel, a pause, an erase's rewrite, the
-- sweeper): it is renewed a third of a lease later if it still needs it. Returns the rows
-- renewed.
CREATE FUNCTION pgcast_renew_v4(p_ids uuid[], p_tokens uuid[], p_lease interval)
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
            ORDER BY l.contact_id FOR UPDATE SKIP LOCKED));
        GET DIAGNOSTICS n = ROW_COUNT;
        total := total + n;
    END LOOP;
    RETURN total;
END
$$;

-- 0037_fresh_floor_scan (issue 32, the database cost per recipient): where fresh rows begin,
-- asked at a drain's end, without walking the partition's key over every row claimed.
--
-- fresh_floor, v2: the lowest fresh contact_id >= p_from, or NULL, as v1, found in two parts:
-- v1's walk of the key over the next 10,000 ids, then, if none is fresh there, the lowest
-- beyond them by one pass over the partition's heap (pgcast_fresh_beyond_v1).
-- * Measured (a 1,000,000-recipient drain by two workers, bench.profile_db): each worker asks
--   when its claims find no fresh row after their cursor, which is at the drain's end. v1
--   walked the key from the worker's floor (0 the first time) over every row claimed since,
--   fetching each from the heap: 0.56 s on the drained partition (bench.fresh_floor), 0.9-2.0 s
--   of server time for the drain's calls, while the last groups were being recorded. A pass
--   over the heap took 0.15 s on the same partition.
-- * A plain read, as v1: a fresh row another transaction has locked counts (a claim about to
--   commit it, or to roll back), so the answer is right whoever holds what.
-- * The walk first: a later look starts at the floor an earlier one found, where the next
--   fresh row is usually close; the pass over the heap is for the stretch beyond.
CREATE FUNCTION pgcast_fresh_beyond_v1(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_indexscan = off
SET enable_indexonlyscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN (SELECT min(l.contact_id) FROM broadcast_recipients l
            WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
              AND l.contact_id >= p_from);
END
$$;

CREATE FUNCTION pgcast_fresh_floor_v2(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    walk constant bigint := 10000;  -- ids whose rows the walk may fetch
    found bigint;
BEGIN
    IF p_from > 9223372036854775807 - walk THEN
        RETURN pgcast_fresh_floor_v1(p_id, p_from);  -- the last ids there are: v1's walk
    END IF;
    found := (SELECT l.contact_id FROM broadcast_recipients l
              WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
                AND l.contact_id >= p_from AND l.contact_id < p_from + walk
              ORDER BY l.contact_id
              LIMIT 1);
    IF found IS NOT NULL THEN
        RETURN found;
    END IF;
    RETURN pgcast_fresh_beyond_v1(p_id, p_from + walk);
END
$$;
