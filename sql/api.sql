-- Queries of the HTTP API (api/). Every statement is scoped to the caller's account.

-- api_health --
-- The database answers (GET /healthz).
SELECT 1 AS ok

-- api_broadcast_status --
-- The current status of one broadcast of an account (to explain a refused transition).
SELECT status FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- api_progress --
-- O(1) progress from the broadcast row, with the database's clock for the rate (since the
-- current run began: the first start, or the last retry).
SELECT status, total, total - sent - failed - skipped - unknown - cancelled AS pending,
       sent, failed, skipped, unknown, cancelled, started_at, finished_at, scheduled_at,
       delivered, bounced, complained,
       (SELECT s.share_per_second FROM rate_shares_active s
        WHERE s.bucket = 'global' AND s.broadcast_id = b.id) AS share_per_second,
       unknown_resolved, unknown_requeued, filter_used,
       coalesce(epoch_started_at, started_at) AS rate_since, epoch_done AS rate_base,
       statement_timestamp() AS now
FROM broadcasts b
WHERE id = %(id)s AND account = %(account)s
