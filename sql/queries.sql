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
-- Inserts or updates contacts from a jsonb array (pgcast_contacts_upsert_v1): under the
-- erasure lock, existing rows locked in id order first; an erased address is left out, an
-- unsubscribe or suppression is never cleared. Returns each written address and whether
-- it is new.
SELECT * FROM pgcast_contacts_upsert_v1(%(account)s, %(rows)s::jsonb, %(replace)s)

-- contacts_lock --
-- The first step of an import in several statements: the erasure lock (shared) and every
-- existing contact among `keys` (lower-cased addresses), locked in id order, before any
-- chunk is written (pgcast_contacts_lock_v1).
SELECT pgcast_contacts_lock_v1(%(account)s, %(keys)s::text[]) AS locked

-- contact_unsubscribe --
-- Marks a contact unsubscribed (keeps the first time) and records it in contact_events, in
-- one statement (nothing recorded when it already was); takes effect at the next handoff.
WITH c AS (
    SELECT id, email, unsubscribed_at FROM contacts
    WHERE account = %(account)s AND lower(email) = lower(%(email)s)
    FOR UPDATE
), u AS (
    UPDATE contacts k SET unsubscribed_at = clock_timestamp(), updated_at = now()
    FROM c WHERE k.id = c.id AND c.unsubscribed_at IS NULL
    RETURNING k.id, k.unsubscribed_at
), e AS (
    INSERT INTO contact_events (account, contact_id, action, source, actor)
    SELECT %(account)s, u.id, 'unsubscribe', %(source)s, %(actor)s::jsonb FROM u
)
SELECT c.id, c.email, coalesce((SELECT u.unsubscribed_at FROM u), c.unsubscribed_at)
       AS unsubscribed_at
FROM c

-- broadcast_create --
-- A new draft; its audit entry names who created it (details); track: its own, else the account's default.
INSERT INTO broadcasts (account, subject, from_address, text_body, html_body, segment_tag,
                        segment_filter, rate_limit, priority, track, audit_log)
VALUES (%(account)s, %(subject)s, %(from_address)s, %(text_body)s, %(html_body)s,
        %(segment_tag)s, %(segment_filter)s::jsonb, %(rate_limit)s, %(priority)s,
        coalesce(%(track)s::text, (SELECT d.mode FROM tracking_defaults d
                                   WHERE d.account = %(account)s), 'none'),
        pgcast_audit_v1('create', NULL, 'draft', %(details)s::jsonb))
RETURNING *

-- broadcast_get --
-- One broadcast of an account.
SELECT * FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- broadcast_list --
-- An account's broadcasts, newest first, keyset-paged by (created_at, id).
SELECT id, account, status, subject, segment_tag, segment_filter, filter_used, total, sent, failed, skipped, unknown,
       cancelled, created_at, started_at, finished_at, scheduled_at
FROM broadcasts
WHERE account = %(account)s
  AND (%(before_at)s::timestamptz IS NULL OR (created_at, id) < (%(before_at)s, %(before_id)s::uuid))
ORDER BY created_at DESC, id DESC
LIMIT %(limit)s

-- broadcast_update_draft --
-- Edits a draft or a scheduled broadcast (CAS on status: one that has started is never
-- edited); NULL keeps a field; details name the caller in the audit.
UPDATE broadcasts
SET subject = coalesce(%(subject)s, subject),
    from_address = coalesce(%(from_address)s, from_address),
    text_body = CASE WHEN %(set_text)s THEN %(text_body)s ELSE text_body END,
    html_body = CASE WHEN %(set_html)s THEN %(html_body)s ELSE html_body END,
    segment_tag = CASE WHEN %(set_tag)s THEN %(segment_tag)s ELSE segment_tag END,
    segment_filter = CASE WHEN %(set_filter)s THEN %(segment_filter)s::jsonb
                          ELSE segment_filter END,
    priority = coalesce(%(priority)s, priority),
    updated_at = now(),
    audit_log = audit_log || pgcast_audit_v1('edit', status, status, %(details)s::jsonb)
WHERE id = %(id)s AND account = %(account)s AND status = ANY (ARRAY['draft', 'scheduled'])
RETURNING *

-- broadcast_delete_draft --
-- Deletes a draft (CAS on status).
DELETE FROM broadcasts
WHERE id = %(id)s AND account = %(account)s AND status = ANY (ARRAY['draft'])
RETURNING id

-- broadcast_send --
-- Snapshot the mailable recipients its filter selects into the broadcast's own partition and
-- start sending (status 'empty', nothing changed, when nobody matches and allow_empty is
-- false; SQLSTATE PGS22 when its filter no longer compiles).
SELECT * FROM pgcast_send_v7(%(account)s, %(id)s, %(allow_empty)s, %(details)s::jsonb)

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
SELECT id, account, subject, from_address, text_body, html_body, track,
       (SELECT secret FROM unsubscribe_keys) AS unsubscribe_key
FROM broadcasts WHERE id = %(id)s

-- claim --
-- Claim up to `limit` rows of one broadcast: requeued first, then fresh after the cursor
-- `after` (pgcast_claim_v3; last_fresh = the cursor's next value, NULL = none left after it).
SELECT * FROM pgcast_claim_v3(%(id)s, %(limit)s, %(token)s, %(worker)s,
                              make_interval(secs => %(lease)s), %(after)s)

-- claim_handoff --
-- Claim up to `limit` rows and hand them off at once (handed = false: only claimed; all
-- of them when the global bucket has a rate by then, which global_rate says); the contact's
-- attributes and tags only when `contact` (the content reads them).
SELECT * FROM pgcast_claim_handoff_v6(%(id)s, %(limit)s, %(token)s, %(worker)s,
                                      make_interval(secs => %(lease)s), %(after)s,
                                      %(contact)s)

-- fresh_floor --
-- The lowest never-claimed pending contact_id >= `from` of one broadcast, or NULL.
SELECT pgcast_fresh_floor_v2(%(id)s, %(from)s) AS floor

-- handoff --
-- The fence: claimed -> sending (or skipped) for one group, with each contact's name, and
-- its attributes and tags when `contact` (pgcast_handoff_v4).
SELECT * FROM pgcast_handoff_v4(%(id)s, %(epoch)s, %(token)s, %(ids)s, %(contact)s)

-- record --
-- One group's provider outcomes and counters (an answer its claim no longer holds: audited);
-- the arrays come as literals (worker.dispatch.record_params).
SELECT * FROM pgcast_record_v7(%(id)s, %(token)s, %(ids)s::bigint[], %(outcomes)s::text[],
                               %(message_ids)s::text[], %(errors)s::text[],
                               %(retry_in)s::double precision[], %(breaker)s)

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
SELECT pgcast_renew_v4(%(ids)s, %(tokens)s, make_interval(secs => %(lease)s)) AS renewed

-- take_tokens --
-- Up to `want` tokens from a bucket for a broadcast (pgcast_take_tokens_v5: its account's
-- and its own fair share of a shared bucket, less what waiting messages are owed; broadcast
-- NULL: first come, first served), and their wire slots, `lead` seconds ahead at the earliest.
SELECT * FROM pgcast_take_tokens_v5(%(name)s, %(want)s, %(broadcast)s, %(lead)s)

-- take_own_tokens --
-- Up to `want` tokens from a broadcast's own bucket (its `rate_limit`), none until it holds half
-- its burst or `want` (pgcast_take_own_v1), and the seconds until it will.
SELECT * FROM pgcast_take_own_v1(%(name)s, %(want)s)

-- give_back_tokens --
-- Tokens taken from a broadcast's own bucket and not used go back (pgcast_give_back_tokens_v1).
SELECT pgcast_give_back_tokens_v1(%(name)s, %(tokens)s)

-- drain_tokens --
-- Empties a bucket for `seconds` (after a throttle); throttles at one moment do not stack.
SELECT pgcast_drain_tokens_v1(%(name)s, %(seconds)s)

-- rate_get --
-- One bucket (operator_set_at NULL: no operator has set it; a worker's PGCAST_RATE may).
SELECT name, rate, burst, tokens, refilled_at, updated_at, operator_set_at, messages_share
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
