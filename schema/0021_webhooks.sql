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
