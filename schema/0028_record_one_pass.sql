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
