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
-- recipients back to pending after a claim: what a claim takes before fresh rows
CREATE INDEX broadcast_recipients_requeued ON broadcast_recipients (contact_id)
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

-- the partial indexes of one broadcast's partition, under the names the parent's indexes
-- adopt at ATTACH: empty on a new partition (a fresh row fails worker IS NOT NULL)
CREATE FUNCTION pgcast_partition_indexes_v1(p_id uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
    bare text := 'broadcast_recipients_' || replace(p_id::text, '-', '');
BEGIN
    EXECUTE format('CREATE INDEX %I ON %s (contact_id)'
                   ' WHERE worker IS NOT NULL AND status = ''pending''', bare || '_requeued', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, status, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''failed'', ''unknown'', ''skipped'')',
                   bare || '_problems', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''claimed'', ''sending'')',
                   bare || '_in_flight', part);
END
$$;

-- a new, unattached partition for one broadcast: its columns, the CHECK that lets ATTACH
-- skip its validation scan, and the three partial indexes that stay empty while it is
-- filled (pgcast_partition_indexes_v1). The primary key is built by
-- pgcast_partition_attach_v2 after the rows are in.
CREATE FUNCTION pgcast_partition_create_v2(p_id uuid)
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
    PERFORM pgcast_partition_indexes_v1(p_id);
    RETURN part;
END
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

-- cancel: draft|sending|paused -> cancelled. Recipients not yet handed off end cancelled.
-- already_queued = recipients the provider had or has (sent, in flight, unknown).
-- v2: counts the rows in flight through 0003's in-flight index (worker IS NOT NULL).
CREATE FUNCTION pgcast_cancel_v2(p_account text, p_id uuid, p_details jsonb)
RETURNS TABLE (ok boolean, status text, already_queued integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    n integer;
    in_flight integer;
BEGIN
    UPDATE broadcasts AS u
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('cancel', u.status, 'cancelled', p_details)
    WHERE u.id = p_id AND u.account = p_account
      AND u.status = ANY (ARRAY['draft', 'sending', 'paused']);
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
-- the rows a claim takes, locked (SKIP LOCKED: a claim never waits): first recipients back
-- to pending after an earlier claim whose retry time has come (the requeued index, the
-- whole broadcast: few rows), then fresh ones after the worker's cursor (the primary key,
-- in contact_id order). last_fresh: the highest fresh contact_id taken, the cursor when no
-- fresh row was needed, NULL when fresh rows were needed and none was free after the
-- cursor (the worker then looks behind it with pgcast_fresh_floor_v1). A fresh row never
-- has a retry time: only a record sets one, and it sets worker too. Index scans only: the
-- planner multiplies the selectivities of status = 'pending' and worker IS NULL, which go
-- together, and near a broadcast's end it took a sequential scan and a sort (0.3-0.7 s at
-- 1,000,000 rows) for what the key walks in milliseconds.
CREATE FUNCTION pgcast_claim_rows_v1(p_id uuid, p_limit integer, p_after bigint,
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
          AND (l.retry_at IS NULL OR l.retry_at <= now())
        ORDER BY l.contact_id
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

-- claim: up to p_limit claimable rows -> claimed (requeued rows first, then fresh rows after
-- the worker's cursor p_after), with a lease. Every row returned carries last_fresh (see
-- pgcast_claim_rows_v1).
CREATE FUNCTION pgcast_claim_v2(p_id uuid, p_limit integer, p_token uuid, p_worker text,
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
    SELECT b.epoch INTO e FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    c := pgcast_claim_rows_v1(p_id, p_limit, p_after);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'claimed', claim_token = p_token, claim_epoch = e,
        worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, r.attempts, e, c.last_fresh;
END
$$;

-- handoff: the fence before the provider call. Moves claimed rows of this claim to
-- sending only while the broadcast is still sending at the claim's epoch; rows whose
-- contact has unsubscribed go to skipped. Returns the rows to send now.
-- Committed by the caller BEFORE the provider is called.
CREATE FUNCTION pgcast_handoff_v1(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
RETURNS TABLE (contact_id bigint, email text, name text)
LANGUAGE plpgsql AS $$
DECLARE
    n_skip integer;
BEGIN
    PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending' AND b.epoch = p_epoch;
    IF NOT FOUND THEN
        RETURN;  -- fenced: cancelled, paused or resumed since the claim
    END IF;
    IF EXISTS (SELECT 1 FROM broadcast_recipients r JOIN contacts c ON c.id = r.contact_id
               WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids)
                 AND c.unsubscribed_at IS NOT NULL) THEN
        -- rare path: it changes a counter, so it takes the broadcast row first (lock
        -- order) and checks the fence again under that lock
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
        UPDATE broadcast_recipients r
        SET status = 'skipped', last_error = 'unsubscribed', lease_expires_at = NULL
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l JOIN contacts c ON c.id = l.contact_id
            WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
              AND l.claim_token = p_token AND c.unsubscribed_at IS NOT NULL
            ORDER BY l.contact_id FOR UPDATE OF l));
        GET DIAGNOSTICS n_skip = ROW_COUNT;
        UPDATE broadcasts SET skipped = skipped + n_skip WHERE id = p_id;
    END IF;
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'sending', handed_at = statement_timestamp()
    FROM contacts c
    WHERE r.broadcast_id = p_id AND c.id = r.contact_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l JOIN contacts k ON k.id = l.contact_id
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND k.unsubscribed_at IS NULL
        ORDER BY l.contact_id FOR UPDATE OF l))
    RETURNING r.contact_id, r.email, c.name;
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

-- send: lock the draft, snapshot its recipients into a new partition, CAS draft -> sending
-- (or straight to sent when nobody matches), all in the caller's one transaction.
CREATE FUNCTION pgcast_send_v3(p_account text, p_id uuid)
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
BEGIN
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status <> 'draft' THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    part := pgcast_partition_create_v2(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked draft) and contacts.id
    -- is unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $1, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND c.unsubscribed_at IS NULL'
        '   AND ($3::text IS NULL OR c.tags @> ARRAY[$3::text])', part)
        USING p_id, p_account, b.segment_tag;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgcast_partition_attach_v2(p_id);
    ELSE
        EXECUTE format('DROP TABLE %s', part);  -- nobody to send to: no partition
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
            jsonb_build_object('recipients', n))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

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
CREATE FUNCTION pgcast_record_v3(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
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
        unknown = unknown + c.n_unknown - was_unknown, cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN c.n_sent > 0 THEN 0 ELSE failure_streak + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT c.n::integer, p_breaker > 0 AND streak > p_breaker;
END
$$;

-- claim and hand off in one statement, for a worker that will send the whole batch at
-- once (a provider fast enough that its group is the batch). Synchronous, like every
-- handoff. Recipients whose contact unsubscribed since the snapshot are only claimed
-- (handed = false): the worker passes them to pgcast_handoff_v1, whose rare path skips
-- them under the broadcast row lock (taking that lock here, after the recipients, would
-- break the lock order).
-- The fence: a cancel marks pending rows cancelled, so it and this function meet on the
-- rows (whichever locks a row first wins, and a handoff commits before the cancel that
-- waited for it). A pause leaves pending rows alone, so it meets this function on an
-- advisory lock instead: shared here, exclusive in pgcast_pause_v2, taken before the
-- broadcast is read. A pause waits for handoffs in progress; a handoff that waited for a
-- pause reads `paused` and hands off nothing.
-- v2: the rows come from pgcast_claim_rows_v1 (requeued first, then fresh after the cursor),
-- and each row returned carries last_fresh.
CREATE FUNCTION pgcast_claim_handoff_v2(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attempts smallint, epoch integer,
               handed boolean, last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    c record;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.epoch INTO e FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    c := pgcast_claim_rows_v1(p_id, p_limit, p_after);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.unsubscribed_at IS NULL THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.unsubscribed_at IS NULL THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM contacts k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, r.attempts, e, k.unsubscribed_at IS NULL,
              c.last_fresh;
END
$$;

-- pause: sending -> paused; claimed rows go back to pending. Takes the advisory lock that
-- fences pgcast_claim_handoff_v2 (exclusive here, shared there).
-- v3: finds the claimed rows through 0003's in-flight index (worker IS NOT NULL).
CREATE FUNCTION pgcast_pause_v3(p_account text, p_id uuid, p_reason text, p_details jsonb)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
BEGIN
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

-- finalize: sending -> sent|failed once nothing is pending, claimed or sending.
-- Only a sending broadcast is looked at. The small indexes answer first (something in flight
-- or requeued: not yet, and no walk). Only then is the partition walked for a never-claimed
-- row; none found, none can appear (rows never become never-claimed again). Then the
-- broadcast row is locked and the small indexes are asked again: rows may have moved
-- between pending and in flight since, and one move leaves a finished status (a late retry,
-- throttle or release turns an unknown row, whose worker's lease ran out, back to pending:
-- pgcast_record_v3), whose record holds the broadcast row until it commits.
-- Not finished only because never-claimed rows are left: one row (false, 'sending'). A
-- worker that found nothing to claim learns from it to look behind its cursor again (the
-- rows of a claim whose asynchronous commit a server crash lost are fresh again).
CREATE FUNCTION pgcast_finalize_v3(p_id uuid)
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
    SET status = CASE WHEN u.sent = 0 AND u.failed > 0 THEN 'failed' ELSE 'sent' END,
        finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('finish', u.status,
            CASE WHEN u.sent = 0 AND u.failed > 0 THEN 'failed' ELSE 'sent' END,
            jsonb_build_object('sent', u.sent, 'failed', u.failed, 'skipped', u.skipped,
                               'unknown', u.unknown))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sending'])
    RETURNING true, u.status;
END
$$;

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

-- sweep: expired claims back to pending, expired handoffs to unknown (never re-sent),
-- drained broadcasts finalized. One broadcast at a time, in id order (as renew), broadcast
-- row locked first. A cancelled broadcast is visited only while its counters say rows are
-- still in flight (a cancel turns every pending and claimed row into cancelled, so what
-- the counters do not account for is sending): no scan of finished broadcasts' rows.
-- v3: its lookups say worker IS NOT NULL (0003's indexes), and it finalizes (with
-- pgcast_finalize_v3) only a broadcast whose counters account for every recipient: one that
-- workers are still draining, or that waits for workers, is not walked at every sweep. The
-- counters only decide when to look; finalize checks the rows. (Workers finalize too, each
-- time a claim finds nothing, whatever the counters say.)
CREATE FUNCTION pgcast_sweep_v3()
RETURNS TABLE (broadcast_id uuid, reclaimed integer, unknown integer, finalized text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    bid uuid;
    n_re integer;
    n_unk integer;
    fin text;
    left_over integer;
BEGIN
    FOR bid IN SELECT b.id FROM broadcasts b
               WHERE b.status IN ('sending', 'paused')
                  OR (b.status = 'cancelled'
                      AND b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled > 0)
               ORDER BY b.id
    LOOP
        PERFORM 1 FROM broadcasts b WHERE b.id = bid FOR NO KEY UPDATE;
        UPDATE broadcast_recipients r
        SET status = 'pending', claim_token = NULL, lease_expires_at = NULL
        WHERE r.broadcast_id = bid AND r.contact_id = ANY (ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = bid AND l.worker IS NOT NULL AND l.status = 'claimed'
              AND l.lease_expires_at < clock_timestamp()
            ORDER BY l.contact_id FOR UPDATE));
        GET DIAGNOSTICS n_re = ROW_COUNT;
        UPDATE broadcast_recipients r
        SET status = 'unknown', last_error = 'worker lost during handoff: outcome unknown'
        WHERE r.broadcast_id = bid AND r.contact_id = ANY (ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = bid AND l.worker IS NOT NULL AND l.status = 'sending'
              AND l.lease_expires_at < clock_timestamp()
            ORDER BY l.contact_id FOR UPDATE));
        GET DIAGNOSTICS n_unk = ROW_COUNT;
        IF n_unk > 0 THEN
            UPDATE broadcasts b SET unknown = b.unknown + n_unk WHERE b.id = bid;
        END IF;
        SELECT b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled
        INTO left_over FROM broadcasts b WHERE b.id = bid;
        fin := NULL;
        IF left_over <= 0 THEN
            SELECT f.status INTO fin FROM pgcast_finalize_v3(bid) f WHERE f.ok;
        END IF;
        IF n_re > 0 OR n_unk > 0 OR fin IS NOT NULL THEN
            RETURN QUERY SELECT bid, n_re, n_unk, fin;
        END IF;
    END LOOP;
END
$$;

-- Plans: with one partition per broadcast, a generic plan of a statement on
-- broadcast_recipients covers every partition and locks them all at each execution (run-time
-- pruning happens after the locks), so it slows down as broadcasts accumulate; measured, a
-- 200k drain with 300 earlier broadcasts' partitions ran 12-16% slower. A custom plan is
-- pruned to the one partition while it is planned: the plpgsql functions that touch
-- recipients always plan that way (a LANGUAGE sql function is planned without its
-- arguments and cannot be pruned at all: finalize, release and sweep have a plpgsql v2).
ALTER FUNCTION pgcast_handoff_v1(uuid, integer, uuid, bigint[])
    SET plan_cache_mode = force_custom_plan;

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
