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
