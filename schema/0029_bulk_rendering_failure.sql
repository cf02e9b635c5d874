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
