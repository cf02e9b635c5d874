-- 0008_feedback: SES feedback (bounces, complaints, deliveries) and the reputation guard.
-- * sns_messages: each SNS MessageId processed once (retries and duplicates change nothing);
--   rows older than the webhook's maximum age are pruned a few at a time by later calls
--   (a message that old is refused by its timestamp before it gets here).
-- * contacts.last_delivery_at: when (SES's time) the newest delivery happened, so soft
--   bounces "in a row" are counted by when they happened, not by when they arrived.
-- * contacts_email: an address's contacts in every account (an untagged hard bounce).
-- * contacts_suppressed_id: an account's suppressed contacts keyset-paged by id.
-- * broadcasts.guard_sent/guard_bounced/guard_complained: the counts when the broadcast last
--   started sending (send or resume); the guard judges only what came after them.
-- * pgcast_ses_event_v1 applies one SES event; pgcast_guard_v1 pauses a broadcast whose
--   bounce or complaint rate is past the limit; pgcast_unsuppress_v1 lifts a suppression.

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
