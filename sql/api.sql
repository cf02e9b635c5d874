-- Queries of the HTTP API (api/). Every statement is scoped to the caller's account.

-- api_health --
-- The database answers (GET /healthz).
SELECT 1 AS ok

-- api_broadcast_status --
-- The current status of one broadcast of an account (to explain a refused transition).
SELECT status FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- api_progress --
-- O(1) progress from the broadcast row, with the database's clock for the rate.
SELECT status, total, total - sent - failed - skipped - unknown - cancelled AS pending,
       sent, failed, skipped, unknown, cancelled, started_at, finished_at, scheduled_at,
       delivered, bounced, complained,
       statement_timestamp() AS now
FROM broadcasts
WHERE id = %(id)s AND account = %(account)s

-- api_recipients_page --
-- A broadcast's recipient rows, keyset-paged by contact_id, only if the account owns it.
SELECT r.contact_id, r.email, r.status, r.attempts, r.last_error, r.sent_at
FROM broadcast_recipients r
WHERE r.broadcast_id = %(id)s
  AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = %(id)s AND b.account = %(account)s)
  AND (%(status)s::text IS NULL OR r.status = %(status)s)
  -- only pending and cancelled rows may lack a worker (broadcast_recipients_claimed_check):
  -- said here, a plan made for any other status can use the partial indexes
  AND (%(status)s::text IS NULL OR %(status)s::text IN ('pending', 'cancelled')
       OR r.worker IS NOT NULL)
  AND r.contact_id > %(after)s
ORDER BY r.contact_id
LIMIT %(limit)s

-- api_broadcast_create --
-- A new draft, its audit entry naming the caller (details: {"via": "api", "sub": ...}).
INSERT INTO broadcasts (account, subject, from_address, text_body, html_body, segment_tag,
                        rate_limit, audit_log)
VALUES (%(account)s, %(subject)s, %(from_address)s, %(text_body)s, %(html_body)s,
        %(segment_tag)s, NULL, pgcast_audit_v1('create', NULL, 'draft', %(details)s::jsonb))
RETURNING *
