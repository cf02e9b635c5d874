-- hooks_add --
-- a new endpoint of an account, unless it has %(max)s already (no row then); the caller shows its secret once
INSERT INTO webhook_endpoints (account, url, events, secret, audit_log)
SELECT %(account)s, %(url)s, %(events)s, %(secret)s,
       jsonb_build_array(jsonb_build_object('at', now(), 'action', 'create',
                                            'actor', %(actor)s::jsonb))
WHERE (SELECT count(*) FROM webhook_endpoints WHERE account = %(account)s) < %(max)s
RETURNING id, account, url, events, enabled, created_at

-- hooks_list --
-- an account's endpoints (never their secrets), oldest first, with what is waiting
SELECT e.id, e.account, e.url, e.events, e.enabled, e.disabled_at, e.disabled_reason,
       e.created_at, e.secret_rotated_at,
       (SELECT count(*) FROM webhook_deliveries d
        WHERE d.endpoint_id = e.id AND d.status = 'pending') AS pending
FROM webhook_endpoints e
WHERE e.account = %(account)s
ORDER BY e.created_at, e.id

-- hooks_remove --
-- delete an endpoint and its deliveries (events no other endpoint holds stay until pruned)
DELETE FROM webhook_endpoints WHERE account = %(account)s AND id = %(id)s RETURNING id

-- hooks_rotate --
-- a new secret for an endpoint (audited); the caller shows it once
UPDATE webhook_endpoints
SET secret = %(secret)s, secret_rotated_at = now(),
    audit_log = audit_log || jsonb_build_array(jsonb_build_object(
        'at', now(), 'action', 'rotate_secret', 'actor', %(actor)s::jsonb))
WHERE account = %(account)s AND id = %(id)s
RETURNING id, secret_rotated_at

-- hooks_enable --
-- enable a disabled endpoint again (audited): its pending deliveries resume, in order
UPDATE webhook_endpoints
SET enabled = true, disabled_at = NULL, disabled_reason = NULL,
    audit_log = audit_log || jsonb_build_array(jsonb_build_object(
        'at', now(), 'action', 'enable', 'actor', %(actor)s::jsonb))
WHERE account = %(account)s AND id = %(id)s
RETURNING id, enabled

-- hooks_deliveries --
-- an endpoint's deliveries, newest first, keyset-paged by id (0 = from the newest)
SELECT d.id, d.event_id, ev.type AS event_type, d.status, d.attempts, d.created_at,
       d.next_attempt_at, d.last_attempt_at, d.last_status, d.last_error, d.latency_ms,
       d.response, d.delivered_at
FROM webhook_deliveries d
JOIN webhook_endpoints e ON e.id = d.endpoint_id
JOIN webhook_events ev ON ev.id = d.event_id
WHERE e.account = %(account)s AND d.endpoint_id = %(id)s
  AND (%(before)s::bigint = 0 OR d.id < %(before)s::bigint)
ORDER BY d.id DESC
LIMIT %(limit)s

-- hooks_redeliver --
-- deliver one event to an endpoint again: a new delivery at the end of the endpoint's queue
INSERT INTO webhook_deliveries (endpoint_id, event_id)
SELECT d.endpoint_id, d.event_id
FROM webhook_deliveries d JOIN webhook_endpoints e ON e.id = d.endpoint_id
WHERE e.account = %(account)s AND d.endpoint_id = %(id)s AND d.id = %(delivery)s
RETURNING id, event_id, status

-- hooks_claim --
-- endpoints whose first pending delivery is due, oldest first, leased to one worker (one at a time per endpoint)
WITH picked AS (
    SELECT e.id
    FROM webhook_endpoints e
    CROSS JOIN LATERAL (SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
                        WHERE d.endpoint_id = e.id AND d.status = 'pending'
                        ORDER BY d.id LIMIT 1) head
    WHERE e.enabled
      AND (e.lease_expires_at IS NULL OR e.lease_expires_at < clock_timestamp())
      AND NOT (e.account = ANY (%(full)s::text[]))
      AND head.next_attempt_at <= clock_timestamp()
    ORDER BY head.id
    LIMIT %(limit)s
    FOR NO KEY UPDATE OF e SKIP LOCKED
)
UPDATE webhook_endpoints e
SET lease_token = %(token)s, worker = %(worker)s,
    lease_expires_at = clock_timestamp() + %(lease)s * interval '1 second'
FROM picked
WHERE e.id = picked.id
RETURNING e.id, e.account, e.url, e.secret, e.lease_token

-- hooks_release --
-- give an endpoint back (nothing more due now, or the worker is stopping)
UPDATE webhook_endpoints SET lease_token = NULL, lease_expires_at = NULL, worker = NULL
WHERE id = %(id)s AND lease_token = %(token)s

-- hooks_next --
-- the next pending deliveries of a leased endpoint, in order, with the body to POST
SELECT d.id, d.event_id, d.next_attempt_at <= clock_timestamp() AS due,
       jsonb_build_object('id', ev.id, 'type', ev.type, 'created_at', ev.created_at,
                          'account', ev.account, 'data', ev.data)::text AS body
FROM webhook_deliveries d
JOIN webhook_events ev ON ev.id = d.event_id
WHERE d.endpoint_id = %(id)s AND d.status = 'pending'
ORDER BY d.id
LIMIT %(limit)s

-- hooks_record --
-- a batch of attempts' outcomes, one per endpoint, each under its endpoint's lease (pgcast_webhook_record_v2)
SELECT delivery_id, outcome
FROM pgcast_webhook_record_v2(%(endpoints)s::uuid[], %(tokens)s::uuid[],
                              %(deliveries)s::bigint[], %(ok)s::boolean[],
                              %(status)s::integer[], %(error)s::text[],
                              %(latency_ms)s::double precision[], %(response)s::text[],
                              %(lease)s * interval '1 second',
                              %(base)s * interval '1 second',
                              %(give_up)s * interval '1 second')

-- hooks_one --
-- one endpoint of an account (is it there?)
SELECT id FROM webhook_endpoints WHERE account = %(account)s AND id = %(id)s

-- hooks_prune_deliveries --
-- up to %(limit)s finished deliveries older than %(days)s days, deleted
DELETE FROM webhook_deliveries
WHERE id IN (SELECT d.id FROM webhook_deliveries d
             WHERE d.status IN ('delivered', 'failed')
               AND coalesce(d.delivered_at, d.last_attempt_at, d.created_at)
                   < now() - %(days)s * interval '1 day'
             LIMIT %(limit)s)

-- hooks_prune_events --
-- up to %(limit)s events older than %(days)s days that no delivery holds any more, deleted
DELETE FROM webhook_events
WHERE id IN (SELECT e.id FROM webhook_events e
             WHERE e.created_at < now() - %(days)s * interval '1 day'
               AND NOT EXISTS (SELECT 1 FROM webhook_deliveries d WHERE d.event_id = e.id)
             ORDER BY e.created_at
             LIMIT %(limit)s)
