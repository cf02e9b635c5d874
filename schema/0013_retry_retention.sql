-- 0013: retries that are never lost, and a rate the operator keeps (issue 24: 4, 6, 8, 10).
--
-- * Retention decides under the broadcast's lock (pgcast_archive_begin_v1 marks it
--   `archiving_at` before its partition is detached), and a retry (v2) refuses a broadcast
--   so marked: a requeued row is never archived `pending`. Finalize (v5) also checks the
--   counters under the lock: rows it cannot see (a detached partition) are not "drained".
-- * retry v2 leaves the `unknown` rows whose call may still be answered (handed off less
--   than p_in_doubt seconds ago) and keeps the claim token of the `unknown` rows it requeues;
--   record v5 records and audits an answer for rows its claim no longer holds.
-- * take v3 commits asynchronously (the rate lock is not held through an fsync); prune v2
--   reads one cutoff per bucket.
-- * rate_limits.operator_set_at: a bucket set by an operator (`pgcast rate set`, an UPDATE)
--   keeps its rate over a worker's PGCAST_RATE, which only starts a bucket nobody set
--   (pgcast_rate_start_v1).

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
