-- Queries of message content: unsubscribe keys, one-click unsubscribe, previews.

-- unsubscribe_key --
-- The key the database generated for unsubscribe tokens (used when no secret is configured).
SELECT secret FROM unsubscribe_keys

-- one_click_unsubscribe --
-- Unsubscribes the contact a token names (keeps the first time) and appends a contact_events
-- row when it changed anything; no row when the contact is gone. A version 1 token also
-- carries its account's first 200 bytes (maybe cut inside a character): compared as bytes.
WITH target AS (
    SELECT id, account FROM contacts
    WHERE id = %(contact_id)s
      AND (%(account_prefix)s::bytea IS NULL
           OR substring(convert_to(account, 'UTF8') FROM 1 FOR 200) = %(account_prefix)s::bytea)
    FOR UPDATE
), changed AS (
    UPDATE contacts c SET unsubscribed_at = clock_timestamp(), updated_at = now()
    FROM target t
    WHERE c.id = t.id AND c.unsubscribed_at IS NULL
    RETURNING c.id, c.account
), logged AS (
    INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id)
    SELECT account, id, 'unsubscribe', 'one-click', '{"via": "one-click"}', %(broadcast_id)s
    FROM changed
    RETURNING 1
)
SELECT t.id, (SELECT count(*) FROM logged) AS changed FROM target t

-- preview_broadcast --
-- One broadcast of an account, as a worker reads it, with the generated unsubscribe key.
SELECT id, account, subject, from_address, text_body, html_body, status,
       (SELECT secret FROM unsubscribe_keys) AS unsubscribe_key
FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- preview_contact --
-- The contact a preview renders for: the one with this address, or the account's first.
SELECT id, email, name, tags, attributes FROM contacts
WHERE account = %(account)s AND (%(email)s::text IS NULL OR lower(email) = lower(%(email)s))
ORDER BY id
LIMIT 1

-- test_send_queue --
-- Queues test sends unless an address may not be mailed (refused) or the account passes its
-- hourly cap (pgcast_test_send_v2).
SELECT * FROM pgcast_test_send_v2(%(account)s, %(id)s, %(to)s, %(contact)s, %(cap)s)

-- test_send_start --
-- A worker takes queued test sends (each is sent at most once).
UPDATE test_sends SET status = 'sending'
WHERE id = ANY(%(ids)s) AND status = 'queued'
RETURNING id, account, broadcast_id, to_address, contact_email

-- test_send_withdraw --
-- The caller gave up waiting: test sends no worker has taken yet never go out (a worker takes
-- only queued ones); returns those withdrawn.
UPDATE test_sends
SET status = 'failed', error = %(error)s, finished_at = clock_timestamp()
WHERE id = ANY(%(ids)s) AND status = 'queued'
RETURNING id

-- test_send_record --
-- The outcome of one test send.
UPDATE test_sends
SET status = %(status)s, message_id = %(message_id)s,
    -- an address erased meanwhile: error texts quote the address (SES), keep none
    error = CASE WHEN to_address = 'erased@erased.invalid' AND %(error)s::text IS NOT NULL
                 THEN 'address erased: error text not kept' ELSE %(error)s END,
    finished_at = clock_timestamp()
WHERE id = %(id)s

-- test_send_status --
-- Test sends of one broadcast of an account, by id: a test send handed to the message path
-- (the message keyed pgcast-test-send-<id>) has that message's outcome (sent; failed for
-- failed, unknown or skipped, the message's status in the error).
SELECT t.id, t.to_address,
       CASE WHEN m.id IS NULL THEN t.status
            WHEN m.status = 'sent' THEN 'sent'
            WHEN m.status IN ('failed', 'unknown', 'skipped') THEN 'failed'
            ELSE 'sending' END AS status,
       coalesce(m.provider_message_id, t.message_id) AS message_id,
       CASE WHEN m.status IN ('failed', 'unknown', 'skipped')
            THEN m.status || ': ' || coalesce(m.last_error, m.status)
            ELSE t.error END AS error,
       t.requested_at, coalesce(m.finished_at, t.finished_at) AS finished_at
FROM test_sends t
LEFT JOIN messages m ON m.account = t.account AND m.idempotency_key = 'pgcast-test-send-' || t.id
WHERE t.id = ANY(%(ids)s) AND t.account = %(account)s AND t.broadcast_id = %(id)s
ORDER BY t.id
