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
