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
