-- Every runtime query of pgcast. A block is `-- name --`, a one-line description, then
-- one statement. Atomic multi-step logic lives in the versioned functions of schema/.

-- migrate_lock --
-- Serialises concurrent `pgcast migrate` runs (released at commit).
SELECT pg_advisory_xact_lock(hashtext('pgcast.migrate'))

-- migrations_table --
-- The bookkeeping table of applied migrations.
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)

-- migrations_applied --
-- Versions already applied.
SELECT version FROM schema_migrations ORDER BY version

-- migration_record --
-- Marks one migration applied.
INSERT INTO schema_migrations (version, name) VALUES (%(version)s, %(name)s)

-- procrastinate_installed --
-- Whether procrastinate's schema is there.
SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS installed

-- contacts_upsert --
-- Inserts or updates contacts from a jsonb array. An empty name or tags keeps what is stored
-- and attributes merge, unless `replace` (then all three are replaced); never clears an
-- unsubscribe or a suppression (the unsubscribed_at and suppressed_reason given only add
-- one, and each one added is appended to contact_events, source `import`); an erased address
-- is left out. Returns each written address and whether it is new.
WITH x AS (
    SELECT x.*
    FROM ROWS FROM (jsonb_to_recordset(%(rows)s::jsonb)
                    AS (email text, name text, tags text[], attributes jsonb,
                        unsubscribed_at timestamptz, suppressed_reason text))
         WITH ORDINALITY AS x(email, name, tags, attributes, unsubscribed_at,
                              suppressed_reason, n)
    WHERE NOT EXISTS (SELECT 1 FROM contact_erasures e
                      WHERE e.account = %(account)s
                        AND e.email_hash = sha256(convert_to(lower(x.email), 'UTF8')))
),
-- the stored contacts as they were before this statement (every CTE reads one snapshot)
stored AS (
    SELECT k.id, k.unsubscribed_at, k.suppressed_at FROM contacts k JOIN x
        ON k.account = %(account)s AND lower(k.email) = lower(x.email)
),
up AS (
INSERT INTO contacts AS c (account, email, name, tags, attributes, unsubscribed_at,
                           suppressed_at, suppressed_reason)
SELECT %(account)s, x.email, coalesce(x.name, ''), coalesce(x.tags, '{}'),
       coalesce(x.attributes, '{}'), x.unsubscribed_at,
       CASE WHEN x.suppressed_reason IS NOT NULL THEN clock_timestamp() END,
       x.suppressed_reason
FROM x
ORDER BY x.n  -- new contacts get their ids in the order given (the anti-join may reorder)
ON CONFLICT (account, lower(email)) DO UPDATE
SET email = EXCLUDED.email,
    name = CASE WHEN %(replace)s OR EXCLUDED.name <> '' THEN EXCLUDED.name ELSE c.name END,
    tags = CASE WHEN %(replace)s OR cardinality(EXCLUDED.tags) > 0 THEN EXCLUDED.tags
                ELSE c.tags END,
    attributes = CASE WHEN %(replace)s THEN EXCLUDED.attributes
                      ELSE c.attributes || EXCLUDED.attributes END,
    unsubscribed_at = coalesce(c.unsubscribed_at, EXCLUDED.unsubscribed_at),
    suppressed_at = coalesce(c.suppressed_at, EXCLUDED.suppressed_at),
    suppressed_reason = coalesce(c.suppressed_reason, EXCLUDED.suppressed_reason),
    updated_at = now()
RETURNING c.id, c.email, (c.xmax = 0) AS inserted, c.unsubscribed_at, c.suppressed_at,
          c.suppressed_reason
),
events AS (
    INSERT INTO contact_events (account, contact_id, action, source, details)
    SELECT %(account)s, up.id, 'unsubscribe', 'import', '{}'::jsonb
    FROM up LEFT JOIN stored b ON b.id = up.id
    WHERE up.unsubscribed_at IS NOT NULL AND b.unsubscribed_at IS NULL
    UNION ALL
    SELECT %(account)s, up.id, 'suppress', 'import',
           jsonb_build_object('reason', up.suppressed_reason)
    FROM up LEFT JOIN stored b ON b.id = up.id
    WHERE up.suppressed_at IS NOT NULL AND b.suppressed_at IS NULL
)
SELECT up.email, up.inserted FROM up

-- contact_unsubscribe --
-- Marks a contact unsubscribed (keeps the first time); takes effect at the next handoff.
UPDATE contacts
SET unsubscribed_at = coalesce(unsubscribed_at, clock_timestamp()), updated_at = now()
WHERE account = %(account)s AND lower(email) = lower(%(email)s)
RETURNING id, email, unsubscribed_at

-- broadcast_create --
-- A new draft; its audit entry names who created it (details).
INSERT INTO broadcasts (account, subject, from_address, text_body, html_body, segment_tag,
                        rate_limit, priority, audit_log)
VALUES (%(account)s, %(subject)s, %(from_address)s, %(text_body)s, %(html_body)s,
        %(segment_tag)s, %(rate_limit)s, %(priority)s,
        pgcast_audit_v1('create', NULL, 'draft', %(details)s::jsonb))
RETURNING *

-- broadcast_get --
-- One broadcast of an account.
SELECT * FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- broadcast_list --
-- An account's broadcasts, newest first, keyset-paged by (created_at, id).
SELECT id, account, status, subject, segment_tag, total, sent, failed, skipped, unknown,
       cancelled, created_at, started_at, finished_at, scheduled_at
FROM broadcasts
WHERE account = %(account)s
  AND (%(before_at)s::timestamptz IS NULL OR (created_at, id) < (%(before_at)s, %(before_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- broadcast_update_draft --
-- Edits a draft (CAS on status); NULL keeps a field; details name the caller in the audit.
UPDATE broadcasts
SET subject = coalesce(%(subject)s, subject),
    from_address = coalesce(%(from_address)s, from_address),
    text_body = CASE WHEN %(set_text)s THEN %(text_body)s ELSE text_body END,
    html_body = CASE WHEN %(set_html)s THEN %(html_body)s ELSE html_body END,
    segment_tag = CASE WHEN %(set_tag)s THEN %(segment_tag)s ELSE segment_tag END,
    priority = coalesce(%(priority)s, priority),
    updated_at = now(),
    audit_log = audit_log || pgcast_audit_v1('edit', status, status, %(details)s::jsonb)
WHERE id = %(id)s AND account = %(account)s AND status = ANY (ARRAY['draft'])
RETURNING *

-- broadcast_delete_draft --
-- Deletes a draft (CAS on status).
DELETE FROM broadcasts
WHERE id = %(id)s AND account = %(account)s AND status = ANY (ARRAY['draft'])
RETURNING id

-- broadcast_send --
-- Snapshot the mailable recipients into the broadcast's own partition and start sending
-- (status 'empty', nothing changed, when nobody matches and allow_empty is false).
SELECT * FROM pgcast_send_v4(%(account)s, %(id)s, %(allow_empty)s, %(details)s::jsonb)

-- analyze_recipients --
-- Fresh planner statistics for one broadcast's partition after a big snapshot (its own
-- transaction, after the send).
SELECT pgcast_analyze_v1(%(id)s)

-- broadcast_cancel --
-- Cancel a draft, scheduled, sending or paused broadcast (pgcast_cancel_v3).
SELECT * FROM pgcast_cancel_v3(%(account)s, %(id)s, %(details)s::jsonb)

-- broadcast_pause --
-- Pause a sending broadcast with a reason; account NULL = any.
SELECT * FROM pgcast_pause_v4(%(account)s, %(id)s, %(reason)s, %(details)s::jsonb)

-- broadcast_resume --
-- Resume a paused broadcast under a new epoch (pgcast_resume_v1).
SELECT * FROM pgcast_resume_v1(%(account)s, %(id)s, %(details)s::jsonb)

-- broadcast_progress --
-- O(1) progress of one broadcast: the counters on its row.
SELECT p.*, b.subject, b.failed_reason
FROM broadcast_progress p JOIN broadcasts b ON b.id = p.broadcast_id
WHERE p.broadcast_id = %(id)s AND p.account = %(account)s

-- active_broadcasts --
-- Broadcasts workers may claim from, with their per-broadcast cap and their nominal fair
-- share of the global rate among the sending broadcasts (account weight over the accounts'
-- weights, times priority over the account's priorities; a fraction of 1). Furthest below
-- their fair share first: least granted per weight, the account's (tokens over its weight)
-- then the broadcast's within it (tokens over its priority). One that has taken nothing
-- lately (no share row) is furthest below; ties (no limit): oldest first.
WITH sending AS (
    SELECT b.id, b.epoch, b.rate_limit, b.account, b.priority, b.started_at,
           coalesce(w.weight, 1) AS weight
    FROM broadcasts b LEFT JOIN rate_weights w ON w.account = b.account
    WHERE b.status = 'sending'
), accounts AS (
    SELECT account, max(weight) AS weight, sum(priority) AS priorities
    FROM sending GROUP BY account
)
SELECT s.id, s.epoch, s.rate_limit,
       s.weight::float8 / (SELECT sum(weight) FROM accounts) * s.priority / a.priorities
           AS share
FROM sending s
JOIN accounts a ON a.account = s.account
LEFT JOIN rate_account_shares ra ON ra.bucket = 'global' AND ra.account = s.account
LEFT JOIN rate_broadcast_shares rb ON rb.bucket = 'global' AND rb.broadcast_id = s.id
ORDER BY ra.vtime NULLS FIRST, rb.vtime NULLS FIRST, s.started_at, s.id

-- broadcast_fence --
-- Whether work claimed at this epoch may still be handed off.
SELECT 1 FROM broadcasts WHERE id = %(id)s AND status = 'sending' AND epoch = %(epoch)s

-- broadcast_content --
-- What a worker needs to render a broadcast's messages (and the generated unsubscribe key).
SELECT id, account, subject, from_address, text_body, html_body,
       (SELECT secret FROM unsubscribe_keys) AS unsubscribe_key
FROM broadcasts WHERE id = %(id)s

-- claim --
-- Claim up to `limit` rows of one broadcast: requeued first, then fresh after the cursor
-- `after` (pgcast_claim_v3; last_fresh = the cursor's next value, NULL = none left after it).
SELECT * FROM pgcast_claim_v3(%(id)s, %(limit)s, %(token)s, %(worker)s,
                              make_interval(secs => %(lease)s), %(after)s)

-- claim_handoff --
-- Claim up to `limit` rows and hand them off at once (handed = false: only claimed; all
-- of them when the global bucket has a rate by then, which global_rate says).
SELECT * FROM pgcast_claim_handoff_v4(%(id)s, %(limit)s, %(token)s, %(worker)s,
                                      make_interval(secs => %(lease)s), %(after)s)

-- fresh_floor --
-- The lowest never-claimed pending contact_id >= `from` of one broadcast, or NULL.
SELECT pgcast_fresh_floor_v1(%(id)s, %(from)s) AS floor

-- handoff --
-- The fence: claimed -> sending (or skipped) for one group, with each contact's name and
-- attributes (pgcast_handoff_v2).
SELECT * FROM pgcast_handoff_v2(%(id)s, %(epoch)s, %(token)s, %(ids)s)

-- record --
-- One group's provider outcomes and counters (an answer its claim no longer holds: audited).
SELECT * FROM pgcast_record_v5(%(id)s, %(token)s, %(ids)s, %(outcomes)s, %(message_ids)s,
                               %(errors)s, %(retry_in)s, %(breaker)s)

-- release --
-- Rows a claim holds but will not hand off go back to pending.
SELECT pgcast_release_v2(%(id)s, %(token)s, %(ids)s) AS released

-- unhandoff --
-- Rows of a claim handed off but provably never given to the provider (ids NULL = all).
SELECT pgcast_unhandoff_v2(%(id)s, %(token)s, %(ids)s) AS undone

-- finalize --
-- sending -> sent|failed when drained, rows and counters alike.
SELECT * FROM pgcast_finalize_v5(%(id)s)

-- sweep_candidates --
-- Sending, paused, and cancelled with rows in flight: two index scans, never a finished one.
SELECT b.id FROM broadcasts b WHERE b.status IN ('sending', 'paused')
UNION
SELECT b.id FROM broadcasts b
WHERE b.status = 'cancelled'
  AND b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled > 0
ORDER BY 1

-- sweep_one --
-- Lease expiry, unknown outcomes and finalization of one broadcast (its own transaction).
SELECT * FROM pgcast_sweep_one_v1(%(id)s)

-- renew --
-- Extends the lease on the claims a live worker holds: (broadcast, claim token) pairs.
SELECT pgcast_renew_v3(%(ids)s, %(tokens)s, make_interval(secs => %(lease)s)) AS renewed

-- take_tokens --
-- Up to `want` tokens from a bucket for a broadcast (pgcast_take_tokens_v3: its account's
-- and its own fair share of a shared bucket; broadcast NULL: first come, first served).
SELECT * FROM pgcast_take_tokens_v3(%(name)s, %(want)s, %(broadcast)s)

-- give_back_tokens --
-- Tokens taken from a broadcast's own bucket and not used go back (pgcast_give_back_tokens_v1).
SELECT pgcast_give_back_tokens_v1(%(name)s, %(tokens)s)

-- drain_tokens --
-- Empties a bucket for `seconds` (after a throttle); throttles at one moment do not stack.
SELECT pgcast_drain_tokens_v1(%(name)s, %(seconds)s)

-- rate_get --
-- One bucket (operator_set_at NULL: no operator has set it; a worker's PGCAST_RATE may).
SELECT name, rate, burst, tokens, refilled_at, updated_at, operator_set_at
FROM rate_limits WHERE name = %(name)s

-- rate_weight_set --
-- An account's weight in the shared buckets (operator only: never through the tenant API).
INSERT INTO rate_weights AS w (account, weight) VALUES (%(account)s, %(weight)s)
ON CONFLICT (account) DO UPDATE SET weight = EXCLUDED.weight, updated_at = now()
RETURNING account, weight, updated_at

-- rate_weights --
-- Every account weight set by the operator (an account without one has weight 1).
SELECT account, weight, updated_at FROM rate_weights ORDER BY account

-- rate_shares --
-- The active shares of a bucket (rate_shares_active): who takes tokens now, and its share.
SELECT account, account_weight, broadcast_id, priority, share_per_second, waiting
FROM rate_shares_active WHERE bucket = %(name)s
ORDER BY account, share_per_second DESC, broadcast_id

-- rate_shares_prune --
-- Forget takers not heard from in a minute (pgcast_rate_prune_v2); how many rows went.
SELECT pgcast_rate_prune_v2() AS pruned

-- rate_set --
-- An operator sets a bucket's rate and burst (the triggers tell the workers, and mark the
-- bucket operator-set: a worker's PGCAST_RATE no longer replaces it).
INSERT INTO rate_limits AS r (name, rate, burst, tokens)
VALUES (%(name)s, %(rate)s, %(burst)s, %(burst)s)
ON CONFLICT (name) DO UPDATE
SET rate = EXCLUDED.rate, burst = EXCLUDED.burst, tokens = least(r.tokens, EXCLUDED.burst),
    updated_at = now()
RETURNING name, rate, burst

-- rate_start --
-- A worker's start: its rate for a bucket no operator has set (ceiling: lower an operator's
-- rate above it too) (pgcast_rate_start_v1).
SELECT * FROM pgcast_rate_start_v1(%(name)s, %(rate)s, %(burst)s, %(ceiling)s)
