-- Queries of the contact commands an operator reaches for (bin/contacts_commands.py and
-- api/contacts.py): list, count, export, resubscribe, erase. Every one is scoped to an account.

-- contacts_page --
-- An account's contacts by address, keyset-paged on the unique index (account, lower(email))
-- so a cursor is an address the caller has seen; optionally by tag and mailing status.
SELECT lower(email) AS key, email, name, tags, attributes, unsubscribed_at, suppressed_at, suppressed_reason,
       created_at, updated_at, confirmed_at
FROM contacts c
WHERE account = %(account)s
  AND lower(email) > %(after)s
  AND (%(tag)s::text IS NULL OR tags @> ARRAY[%(tag)s::text])
  AND (%(status)s::text IS NULL
       OR (%(status)s = 'subscribed' AND pgcast_mailable(c))
       OR (%(status)s = 'unconfirmed' AND confirmed_at IS NULL)
       OR (%(status)s = 'unsubscribed' AND unsubscribed_at IS NOT NULL)
       OR (%(status)s = 'suppressed' AND suppressed_at IS NOT NULL))
ORDER BY lower(email)
LIMIT %(limit)s

-- contacts_attribute_keys --
-- Every attribute name an account's contacts use (the columns of `contacts export`).
SELECT DISTINCT k.key
FROM contacts c, jsonb_object_keys(c.attributes) AS k(key)
WHERE c.account = %(account)s AND c.attributes <> '{}'
ORDER BY 1

-- contacts_count --
-- How many contacts an account has, by mailing status, optionally of one tag; subscribed
-- means mailable (pgcast_mailable), and unconfirmed sign-ups are counted apart.
SELECT count(*) AS total,
       count(*) FILTER (WHERE pgcast_mailable(c)) AS subscribed,
       count(*) FILTER (WHERE confirmed_at IS NULL) AS unconfirmed,
       count(*) FILTER (WHERE unsubscribed_at IS NOT NULL) AS unsubscribed,
       count(*) FILTER (WHERE suppressed_at IS NOT NULL) AS suppressed
FROM contacts c
WHERE account = %(account)s
  AND (%(tag)s::text IS NULL OR tags @> ARRAY[%(tag)s::text])

-- contact_resubscribe --
-- Clears a contact's unsubscribe and records it in contact_events, in one statement;
-- `changed` is false when the contact was not unsubscribed (nothing recorded).
WITH c AS (
    SELECT id, email, unsubscribed_at, suppressed_at FROM contacts
    WHERE account = %(account)s AND lower(email) = lower(%(email)s)
    FOR UPDATE
), u AS (
    UPDATE contacts k SET unsubscribed_at = NULL, updated_at = now()
    FROM c WHERE k.id = c.id AND c.unsubscribed_at IS NOT NULL
    RETURNING k.id
), e AS (
    INSERT INTO contact_events (account, contact_id, action, source, actor)
    SELECT %(account)s, u.id, 'resubscribe', %(source)s, %(actor)s::jsonb FROM u
)
SELECT c.id, c.email, EXISTS (SELECT 1 FROM u) AS changed,
       c.suppressed_at IS NOT NULL AS suppressed
FROM c

-- contact_erase --
-- Erases one address of an account (pgcast_erase_v7: v3, its messages with their errors,
-- diagnostics and keys, its opens and clicks, the filters that name it; it waits briefly for
-- the contact, the fence and those filters' rows while it holds the erasure lock): contact_id
-- NULL when there was none (its hash is kept all the same, so it is never imported).
SELECT * FROM pgcast_erase_v7(%(account)s, %(email)s, %(source)s, %(actor)s::jsonb)

-- recipients_page --
-- A broadcast's recipient rows by contact id, keyset-paged, optionally of one status
-- (`pgcast broadcast recipients`); only if the account owns the broadcast.
SELECT r.contact_id, r.email, r.status, r.attempts, r.last_error, r.provider_message_id,
       r.sent_at
FROM broadcast_recipients r
WHERE r.broadcast_id = %(id)s
  AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = %(id)s AND b.account = %(account)s)
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  -- only pending and cancelled rows may lack a worker: said here, a plan for any other
  -- status can use the partial indexes
  AND (%(status)s::text IS NULL OR %(status)s::text IN ('pending', 'cancelled')
       OR r.worker IS NOT NULL)
  AND r.contact_id > %(after)s
ORDER BY r.contact_id
LIMIT %(limit)s

-- broadcast_id_prefix --
-- The broadcasts of an account (NULL: of every account, for the operator's lookup) whose id
-- starts with a prefix (at most two: enough to tell a unique prefix from an ambiguous one).
SELECT id FROM broadcasts
WHERE (%(account)s::text IS NULL OR account = %(account)s)
  AND id::text LIKE %(prefix)s || '%%'
ORDER BY id
LIMIT 2

-- broadcast_counts --
-- A broadcast's status and counters (the worker logs them when it finishes one).
SELECT status, total, sent, failed, skipped, unknown, cancelled FROM broadcasts WHERE id = %(id)s
