-- 0017_messages: transactional messages (issue 26). One email to one address, written in the
-- transaction of the change that causes it (the outbox pattern), delivered by the same workers
-- as broadcast recipients: claimed with SKIP LOCKED, handed off behind a fence that commits
-- before the provider call, recorded. `queued` rows are claimed by setting a claim token and
-- pushing not_before to the lease's end (a claim whose worker died is claimable again when its
-- lease ends, with no sweep); `sending` rows whose lease ended are `unknown`, never re-sent.
-- Categories: transactional (the default) and confirmation (double opt-in mail) go to
-- unsubscribed contacts; marketing does not. Suppressed and erased addresses are skipped.
-- Messages take tokens from the global bucket ahead of broadcasts, up to messages_share of
-- the rate while broadcasts are waiting.

CREATE TABLE messages (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account             text        NOT NULL,
    idempotency_key     text,
    category            text        NOT NULL DEFAULT 'transactional',
    status              text        NOT NULL DEFAULT 'queued',
    to_address          text        NOT NULL,
    from_address        text        NOT NULL,
    reply_to            text,
    subject             text        NOT NULL,
    text_body           text,
    html_body           text,
    -- extra headers (an allow-list checked by the API) and SES EmailTags, as JSON objects
    headers             jsonb       NOT NULL DEFAULT '{}',
    tags                jsonb       NOT NULL DEFAULT '{}',
    -- provider calls that counted (sent, failed, retried, unknown; a throttle does not)
    attempts            smallint    NOT NULL DEFAULT 0,
    -- a queued row is claimable from then on: its retry time, or its claim's lease end
    not_before          timestamptz NOT NULL DEFAULT clock_timestamp(),
    claim_token         uuid,
    worker              text,
    lease_expires_at    timestamptz,
    created_at          timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- the handoff: the fence passed, the provider call about to start
    handed_at           timestamptz,
    sent_at             timestamptz,
    finished_at         timestamptz,
    provider_message_id text,
    last_error          text,
    -- feedback from the provider (SES events), by provider_message_id
    delivered_at        timestamptz,
    bounced_at          timestamptz,
    complained_at       timestamptz,
    feedback_detail     text,
    CONSTRAINT messages_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT messages_key_length CHECK (char_length(idempotency_key) BETWEEN 1 AND 255),
    CONSTRAINT messages_category_check
        CHECK (category IN ('transactional', 'marketing', 'confirmation')),
    CONSTRAINT messages_status_check
        CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'unknown', 'skipped')),
    CONSTRAINT messages_body_check CHECK (text_body IS NOT NULL OR html_body IS NOT NULL),
    CONSTRAINT messages_headers_check CHECK (jsonb_typeof(headers) = 'object'),
    CONSTRAINT messages_tags_check CHECK (jsonb_typeof(tags) = 'object'),
    CONSTRAINT messages_worker_check CHECK (claim_token IS NULL OR worker IS NOT NULL)
);
-- one message per key and account (a NULL key: no idempotency)
CREATE UNIQUE INDEX messages_account_key ON messages (account, idempotency_key);
CREATE INDEX messages_account_created ON messages (account, created_at);
-- the claimable rows: queued ones, by when they may be claimed
CREATE INDEX messages_claimable ON messages (not_before) WHERE status = 'queued';
-- the rows in the provider's hands, for the sweep that makes lost ones unknown
CREATE INDEX messages_in_flight ON messages (lease_expires_at) WHERE status = 'sending';
CREATE INDEX messages_provider_id ON messages (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- For DBAs and GET /messages/{id}: one row per message, without its bodies.
CREATE VIEW message_status AS
SELECT id, account, category, status, to_address, from_address, subject, idempotency_key,
       attempts, last_error AS error, provider_message_id, created_at, handed_at, sent_at,
       finished_at, delivered_at, bounced_at, complained_at, feedback_detail,
       CASE WHEN status = 'queued' AND claim_token IS NOT NULL
                 AND lease_expires_at > clock_timestamp() THEN true ELSE false END AS claimed
FROM messages;

-- Enqueue one message (the versioned implementation of pgcast_send_message). Validates what
-- it can (an address with one @, a subject, a body, the category, the senders rule on from),
-- raising SQLSTATE 22023 with a clear message. An address erased from the account is never
-- stored: the row is `skipped` with the placeholder address and no subject or bodies. The same key again (committed,
-- or committing in another session: ON CONFLICT waits for it) returns the first message,
-- created = false. A new queued message NOTIFYs the workers (one notification a transaction:
-- Postgres folds equal payloads).
CREATE FUNCTION pgcast_send_message_v1(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, created boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := btrim(coalesce(p_to, ''));
    sender text;
    allowed text[];
    mid uuid;
    st text;
    erased boolean;
BEGIN
    IF p_account IS NULL OR char_length(p_account) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'account must be 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF addr !~ '^[^@\s<>(),;:"\[\]\\]+@[^@\s<>(),;:"\[\]\\]+\.[^@\s<>(),;:"\[\]\\]+$'
       OR char_length(addr) > 254 THEN
        RAISE EXCEPTION 'to: % is not an email address', p_to USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_subject, '')) = '' THEN
        RAISE EXCEPTION 'subject must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_text IS NULL AND p_html IS NULL THEN
        RAISE EXCEPTION 'a message needs a text or an html body' USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_from, '')) = '' THEN
        RAISE EXCEPTION 'from must not be empty' USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_category, '') NOT IN ('transactional', 'marketing', 'confirmation') THEN
        RAISE EXCEPTION 'category must be transactional, marketing or confirmation, not %',
            p_category USING ERRCODE = '22023';
    END IF;
    -- the senders rule (0015): with senders, the From's address must be one or at one
    allowed := ARRAY(SELECT s.sender FROM senders s WHERE s.account = p_account);
    IF cardinality(allowed) > 0 THEN
        sender := lower(btrim(coalesce(substring(p_from FROM '<([^<>]*)>\s*$'), p_from)));
        IF NOT (sender = ANY (allowed) OR split_part(sender, '@', 2) = ANY (allowed)) THEN
            RAISE EXCEPTION 'from: % is not a sender this account may use', sender
                USING ERRCODE = '22023',
                      HINT = 'an operator allows more with `pgcast senders add`';
        END IF;
    END IF;
    -- an erase cannot commit between this check and the insert
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    erased := pgcast_erased_v1(p_account, addr);
    INSERT INTO messages AS m (account, idempotency_key, category, status, to_address,
                               from_address, reply_to, subject, text_body, html_body, headers,
                               tags, last_error, finished_at)
    VALUES (p_account, p_key, p_category, CASE WHEN erased THEN 'skipped' ELSE 'queued' END,
            CASE WHEN erased THEN 'erased@erased.invalid' ELSE addr END, btrim(p_from),
            CASE WHEN NOT erased THEN p_reply_to END,
            CASE WHEN erased THEN '(erased)' ELSE p_subject END,
            CASE WHEN erased THEN '' ELSE p_text END, CASE WHEN NOT erased THEN p_html END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_headers, '{}') END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_tags, '{}') END,
            CASE WHEN erased THEN 'contact erased' END,
            CASE WHEN erased THEN clock_timestamp() END)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING m.id, m.status INTO mid, st;
    IF mid IS NOT NULL THEN
        IF st = 'queued' THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names applications call inside their own transactions (never renamed; each
-- wraps the current version). Returns the message's id.
CREATE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                    text_body text, html_body text, from_address text,
                                    idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v1(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                    text_body text, html_body text, from_address text,
                                    idempotency_key text, category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v1(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- Claim up to p_limit claimable messages for one worker: the claim token, the lease (its end
-- is also when the row is claimable again). SKIP LOCKED, in a CTE (bug #15715). May commit
-- asynchronously: a crash can only lose the claim (the rows stay claimable).
CREATE FUNCTION pgcast_message_claim_v1(p_limit integer, p_token uuid, p_worker text,
                                        p_lease interval)
RETURNS TABLE (id uuid, attempts smallint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    RETURN QUERY
    WITH picked AS (
        SELECT q.id FROM messages q
        WHERE q.status = 'queued' AND q.not_before <= clock_timestamp()
        ORDER BY q.not_before
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    )
    UPDATE messages m
    SET claim_token = p_token, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease,
        not_before = clock_timestamp() + p_lease
    FROM picked WHERE m.id = picked.id
    RETURNING m.id, m.attempts;
END
$$;

-- The fence before the provider call: this claim's queued rows whose lease holds move to
-- sending; those whose address is suppressed or erased in the account, or unsubscribed for a
-- `marketing` message, go to skipped with the reason. Under the contacts fence of each
-- account (shared; exclusive in every writer of the columns read), rows locked in id order.
-- Synchronous whatever the configuration; committed before the provider is called.
CREATE FUNCTION pgcast_message_handoff_v1(p_token uuid, p_ids uuid[])
RETURNS TABLE (id uuid, account text, category text, to_address text, from_address text,
               reply_to text, subject text, text_body text, html_body text, headers jsonb,
               tags jsonb, attempts smallint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    FOR acct IN SELECT DISTINCT m.account FROM messages m WHERE m.id = ANY (p_ids)
                ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    END LOOP;
    locked := ARRAY(
        SELECT m.id FROM messages m
        WHERE m.id = ANY (p_ids) AND m.status = 'queued' AND m.claim_token = p_token
          AND m.lease_expires_at > clock_timestamp()
        ORDER BY m.id FOR UPDATE);
    UPDATE messages m
    SET status = 'skipped', finished_at = clock_timestamp(), claim_token = NULL,
        lease_expires_at = NULL, last_error = g.why
    FROM (SELECT q.id,
                 CASE WHEN q.to_address = 'erased@erased.invalid'
                           OR pgcast_erased_v1(q.account, q.to_address) THEN 'contact erased'
                      WHEN c.suppressed_at IS NOT NULL
                           THEN 'suppressed: ' || c.suppressed_reason
                      WHEN c.unsubscribed_at IS NOT NULL AND q.category = 'marketing'
                           THEN 'unsubscribed'
                 END AS why
          FROM messages q
          LEFT JOIN contacts c ON c.account = q.account AND lower(c.email) = lower(q.to_address)
          WHERE q.id = ANY (locked)) g
    WHERE m.id = g.id AND g.why IS NOT NULL;
    RETURN QUERY
    UPDATE messages m SET status = 'sending', handed_at = clock_timestamp()
    WHERE m.id = ANY (locked) AND m.status = 'queued'
    RETURNING m.id, m.account, m.category, m.to_address, m.from_address, m.reply_to,
              m.subject, m.text_body, m.html_body, m.headers, m.tags, m.attempts;
END
$$;

-- Claimed rows not handed off go back (claimable at once, no attempt counted).
CREATE FUNCTION pgcast_message_release_v1(p_token uuid, p_ids uuid[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE messages m
    SET claim_token = NULL, lease_expires_at = NULL, not_before = clock_timestamp()
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q WHERE q.id = ANY (p_ids)
                            AND q.status = 'queued' AND q.claim_token = p_token
                            ORDER BY q.id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- The outcomes of one claim's calls: sent (the provider's id), failed, unknown (maybe sent:
-- never re-sent), retry (queued again after retry_in, an attempt), throttled (queued again
-- after retry_in, not an attempt), release (queued again at once, never called). Only rows
-- this claim handed off. May commit asynchronously: a crash leaves rows `sending`, which
-- the sweep makes `unknown` (never re-sent).
CREATE FUNCTION pgcast_message_record_v1(p_token uuid, p_ids uuid[], p_outcomes text[],
                                         p_message_ids text[], p_errors text[],
                                         p_retry_in double precision[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET status = CASE o.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed'
                                WHEN 'unknown' THEN 'unknown' ELSE 'queued' END,
        attempts = m.attempts + CASE WHEN o.outcome IN ('throttled', 'release') THEN 0 ELSE 1 END,
        provider_message_id = coalesce(o.message_id, m.provider_message_id),
        last_error = CASE WHEN o.outcome = 'sent' THEN NULL ELSE o.error END,
        sent_at = CASE WHEN o.outcome = 'sent' THEN clock_timestamp() ELSE m.sent_at END,
        finished_at = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown')
                           THEN clock_timestamp() END,
        claim_token = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown') THEN m.claim_token END,
        lease_expires_at = NULL,
        not_before = CASE WHEN o.outcome IN ('retry', 'throttled', 'release')
                          THEN clock_timestamp() + make_interval(secs => coalesce(o.retry_in, 0))
                          ELSE m.not_before END
    FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
         AS o(id, outcome, message_id, error, retry_in)
    WHERE m.id = o.id AND m.status = 'sending' AND m.claim_token = p_token;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Extends the leases of a live worker's claims (by claim token, never by worker).
CREATE FUNCTION pgcast_message_renew_v1(p_tokens uuid[], p_lease interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET lease_expires_at = clock_timestamp() + p_lease,
        not_before = CASE WHEN m.status = 'queued' THEN clock_timestamp() + p_lease
                          ELSE m.not_before END
    WHERE m.claim_token = ANY (p_tokens) AND m.status IN ('queued', 'sending')
      AND m.lease_expires_at > clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Rows a dead worker left in the provider's hands (sending, lease over): unknown, never
-- re-sent. Returns how many.
CREATE FUNCTION pgcast_message_sweep_v1()
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    UPDATE messages m
    SET status = 'unknown', finished_at = clock_timestamp(), lease_expires_at = NULL,
        attempts = m.attempts + 1,
        last_error = 'in doubt: the worker was lost after the handoff (maybe sent; never re-sent)'
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q
                            WHERE q.status = 'sending' AND q.lease_expires_at < clock_timestamp()
                            ORDER BY q.id FOR UPDATE SKIP LOCKED));
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- One SES event about a message, by the provider's message id: delivered, bounced or
-- complained noted with its time and detail; a message still `unknown` that SES accepted
-- (any event but reject and renderingfailure) becomes `sent`, one it did not becomes
-- `failed`. Returns the message's id (NULL: no message has that provider id).
CREATE FUNCTION pgcast_message_feedback_v1(p_provider_id text, p_event text, p_at timestamptz,
                                           p_detail text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    mid uuid;
BEGIN
    UPDATE messages m
    SET delivered_at = CASE WHEN p_event = 'delivery' THEN coalesce(m.delivered_at, p_at)
                            ELSE m.delivered_at END,
        bounced_at = CASE WHEN p_event IN ('bounce', 'soft_bounce')
                          THEN coalesce(m.bounced_at, p_at) ELSE m.bounced_at END,
        complained_at = CASE WHEN p_event = 'complaint' THEN coalesce(m.complained_at, p_at)
                             ELSE m.complained_at END,
        feedback_detail = CASE WHEN p_event IN ('bounce', 'soft_bounce', 'complaint')
                               THEN coalesce(p_detail, m.feedback_detail)
                               ELSE m.feedback_detail END,
        status = CASE WHEN m.status <> 'unknown' THEN m.status
                      WHEN p_event IN ('reject', 'renderingfailure') THEN 'failed'
                      ELSE 'sent' END
    WHERE m.provider_message_id = p_provider_id
    RETURNING m.id INTO mid;
    RETURN mid;
END
$$;

-- An erase (pgcast_erase_v3 inserts the keyed hash under the exclusive erasure lock) takes
-- the address out of the account's messages in the same transaction: a queued one is
-- skipped, and every one keeps only the placeholder address, no subject and no bodies.
CREATE FUNCTION pgcast_message_erase_v1() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE messages m
    SET to_address = 'erased@erased.invalid', subject = '(erased)', text_body = '',
        html_body = NULL, headers = '{}', tags = '{}', reply_to = NULL,
        status = CASE WHEN m.status = 'queued' THEN 'skipped' ELSE m.status END,
        last_error = CASE WHEN m.status = 'queued' THEN 'contact erased' ELSE m.last_error END,
        finished_at = coalesce(m.finished_at, clock_timestamp())
    FROM erasure_keys k
    WHERE m.account = NEW.account AND m.to_address <> 'erased@erased.invalid'
      AND sha256(k.k2 || sha256(k.k1 || sha256(convert_to(lower(btrim(m.to_address)), 'UTF8'))))
          = NEW.email_hash;
    RETURN NULL;
END
$$;
CREATE TRIGGER contact_erasures_messages AFTER INSERT ON contact_erasures
    FOR EACH ROW EXECUTE FUNCTION pgcast_message_erase_v1();

-- Priority in the one bucket. Messages (and outside senders) take from the global bucket
-- ahead of broadcasts: while they wait, a broadcast's take leaves them what they asked for,
-- up to their credit. Their credit refills at messages_share x rate (up to that share of the
-- burst, at least one token) and caps them only while broadcasts are waiting; with no
-- broadcast waiting they may use the whole rate.
ALTER TABLE rate_limits ADD COLUMN messages_share double precision NOT NULL DEFAULT 0.5
    CONSTRAINT rate_limits_messages_share_check CHECK (messages_share BETWEEN 0 AND 1);
ALTER TABLE rate_limits ADD COLUMN messages_credit double precision NOT NULL DEFAULT 1;
ALTER TABLE rate_limits ADD COLUMN messages_refilled_at timestamptz NOT NULL
    DEFAULT clock_timestamp();
ALTER TABLE rate_limits ADD COLUMN messages_waiting_at timestamptz;
ALTER TABLE rate_limits ADD COLUMN messages_want integer NOT NULL DEFAULT 0;

-- Up to p_want tokens for messages from bucket p_name, under the bucket's rate lock. Committed
-- asynchronously, as pgcast_take_tokens_v3 (the handoff after it flushes it).
CREATE FUNCTION pgcast_take_tokens_messages_v1(p_name text, p_want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    credit double precision;
    cap double precision;
    limited boolean;
    g integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    cap := greatest(1, b.burst * b.messages_share);
    credit := least(cap, b.messages_credit + greatest(0, extract(epoch FROM
                    t - b.messages_refilled_at)) * b.rate * b.messages_share);
    -- broadcasts waiting: a broadcast's take that got less than it asked for lately
    limited := EXISTS (SELECT 1 FROM rate_broadcast_shares s
                       WHERE s.bucket = p_name AND s.waiting_at >
                             t - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst)));
    g := floor(greatest(0, least(p_want::double precision, have,
                                 CASE WHEN limited THEN credit ELSE p_want END)))::integer;
    UPDATE rate_limits
    SET tokens = have - g, refilled_at = t, messages_credit = greatest(0, credit - g),
        messages_refilled_at = t,
        messages_waiting_at = CASE WHEN g < p_want THEN t END,
        messages_want = p_want - g
    WHERE name = p_name;
    RETURN QUERY SELECT g, CASE
        WHEN g > 0 THEN 0.0
        WHEN have < 1 THEN (1 - have) / b.rate
        WHEN b.messages_share = 0 THEN 1.0
        ELSE (1 - credit) / (b.rate * b.messages_share) END;
END
$$;

-- The stable name for mail that leaves through software other than pgcast: up to n tokens
-- from the global bucket, with the priority of messages. Call it before each send (or group)
-- and send only `granted`; wait wait_seconds when it is 0.
CREATE FUNCTION pgcast_take_tokens_external(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE sql AS $$
    SELECT * FROM pgcast_take_tokens_messages_v1('global', n)
$$;

-- take, v4: v3, leaving messages what they wait for. While a message taker waits (it asked
-- within the waiting horizon and got less than it wanted), a broadcast's take sees the bucket
-- less the tokens the messages want, up to their credit.
CREATE FUNCTION pgcast_take_tokens_v4(p_name text, p_want integer, p_broadcast uuid)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    reserve double precision;
    credit double precision;
    held double precision;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 OR b.messages_waiting_at IS NULL OR b.messages_want <= 0
       OR b.messages_waiting_at <= clock_timestamp()
           - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst)) THEN
        RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    credit := least(greatest(1, b.burst * b.messages_share), b.messages_credit
                    + greatest(0, extract(epoch FROM t - b.messages_refilled_at))
                      * b.rate * b.messages_share);
    reserve := least(have, b.messages_want, credit);
    IF reserve <= 0 THEN
        RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
        RETURN;
    END IF;
    -- v3 sees the bucket without the reserve; the reserve is put back after it took
    held := reserve;
    UPDATE rate_limits SET tokens = have - held, refilled_at = t, messages_credit = credit,
                           messages_refilled_at = t WHERE name = p_name;
    RETURN QUERY SELECT * FROM pgcast_take_tokens_v3(p_name, p_want, p_broadcast);
    UPDATE rate_limits SET tokens = tokens + held WHERE name = p_name;
END
$$;

-- `pgcast rate messages-share F`: the share of the rate messages may take while broadcasts
-- wait. Returns the bucket's name and the share now.
CREATE FUNCTION pgcast_messages_share_v1(p_name text, p_share double precision)
RETURNS TABLE (name text, messages_share double precision)
LANGUAGE sql AS $$
    UPDATE rate_limits r SET messages_share = p_share, updated_at = now()
    WHERE r.name = p_name
    RETURNING r.name, r.messages_share
$$;
