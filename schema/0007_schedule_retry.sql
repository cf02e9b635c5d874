-- 0007_schedule_retry: scheduled sends, and a retry of the recipients a broadcast missed.
-- * broadcasts.failed_reason: why a broadcast ended failed without sending (missed_window,
--   empty_segment); NULL otherwise.
-- * pgcast_schedule_v1 / pgcast_unschedule_v1: draft <-> scheduled (CAS + audit).
-- * pgcast_start_due_v1: starts one due scheduled broadcast (the sweeper calls it until it
--   answers nothing), through pgcast_send_v4 (0005), exactly once whatever the number of
--   callers.
-- * pgcast_retry_v1: a finished broadcast's failed (and, when asked, unknown) rows back to
--   pending under a new epoch, the broadcast back to sending.

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

-- start: the due scheduled broadcast whose time came first, started through the send
-- function (pgcast_send_v4) in the caller's one transaction; no row when none is due. The
-- sweeper calls it until it answers nothing, one broadcast per transaction. SKIP LOCKED:
-- concurrent sweepers each take another broadcast (or none), and the send's compare-and-set
-- on the locked row makes every start happen once. The due rows come from the
-- broadcasts_scheduled index, in time order: O(due), whatever the number of broadcasts
-- scheduled later. A start later than not_after ends the broadcast failed (missed_window);
-- one whose segment has nobody mailable at its start ends failed (empty_segment: the send
-- answers 'empty' and changes nothing): never a silent empty send. The audit entry of the
-- start (the send's, or the failure's) records scheduled_at, started_at and the lateness.
CREATE FUNCTION pgcast_start_due_v1()
RETURNS TABLE (broadcast_id uuid, status text, queued integer, reason text,
               lateness_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    s record;
    late double precision;
    why text;
    started jsonb;
BEGIN
    -- a start that failed is as durable as one that sent (send_v4 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT d.id, d.account, d.scheduled_at, d.not_after INTO b
    FROM broadcasts d
    WHERE d.status = 'scheduled' AND d.scheduled_at <= now()
    ORDER BY d.scheduled_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    late := round(extract(epoch FROM now() - b.scheduled_at), 3);
    started := jsonb_build_object('via', 'schedule', 'scheduled_at', b.scheduled_at,
                                  'not_after', b.not_after, 'started_at', now(),
                                  'lateness_seconds', late);
    IF b.not_after IS NOT NULL AND now() > b.not_after THEN
        why := 'missed_window';
    ELSE
        SELECT * INTO s FROM pgcast_send_v4(b.account, b.id, false, started);
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
