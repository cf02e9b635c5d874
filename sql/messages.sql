-- Transactional messages (0017, issue 26): enqueue, claim, hand off, record, sweep, status.

-- message_send --
-- Enqueue one message (pgcast_send_message_v3): its id, whether this call created it (false:
-- the idempotency key named an earlier one), its status. notify false: no NOTIFY in this
-- commit (the API wakes the loops after it, wake_messages, one NOTIFY for many commits).
SELECT * FROM pgcast_send_message_v3(%(account)s, %(to)s, %(subject)s, %(text)s, %(html)s,
                                     %(from)s, %(key)s, %(category)s, %(reply_to)s,
                                     %(headers)s::jsonb, %(tags)s::jsonb, %(notify)s)

-- message_get --
-- One message of an account, as the message_status view shows it.
SELECT * FROM message_status WHERE id = %(id)s AND account = %(account)s

-- message_get_any --
-- One message of any account (the operator's CLI).
SELECT * FROM message_status WHERE id = %(id)s

-- message_claim --
-- Claim up to `limit` claimable messages for this worker (pgcast_message_claim_v1).
SELECT * FROM pgcast_message_claim_v1(%(limit)s, %(token)s, %(worker)s,
                                      make_interval(secs => %(lease)s))

-- message_handoff --
-- The fence before the provider call: the rows to send now (pgcast_message_handoff_v2).
SELECT * FROM pgcast_message_handoff_v2(%(token)s, %(ids)s::uuid[])

-- message_release --
-- Claimed rows not handed off go back (pgcast_message_release_v1).
SELECT pgcast_message_release_v1(%(token)s, %(ids)s::uuid[]) AS released

-- message_unhandoff --
-- A handoff whose answer was lost (committed or not): this claim's rows of it back to queued,
-- claimable at once (the worker made no call for them).
UPDATE messages
SET status = 'queued', handed_at = NULL, claim_token = NULL, lease_expires_at = NULL,
    not_before = clock_timestamp()
WHERE id = ANY (%(ids)s::uuid[]) AND claim_token = %(token)s AND status IN ('queued', 'sending')

-- message_record --
-- One claim's outcomes (pgcast_message_record_v2).
SELECT pgcast_message_record_v2(%(token)s, %(ids)s::uuid[], %(outcomes)s::text[],
                                %(message_ids)s::text[], %(errors)s::text[],
                                %(retry_in)s::float8[]) AS recorded

-- message_renew --
-- Extend the leases of this worker's message claims (pgcast_message_renew_v2).
SELECT pgcast_message_renew_v2(%(tokens)s::uuid[], make_interval(secs => %(lease)s)) AS renewed

-- message_sweep --
-- Messages a dead worker left sending past their lease become unknown (pgcast_message_sweep_v1).
SELECT pgcast_message_sweep_v1() AS unknown

-- message_take_tokens --
-- Up to `want` tokens for messages, ahead of broadcasts up to their share, and their wire
-- slots, `lead` seconds ahead at the earliest (pgcast_take_tokens_messages_v2).
SELECT * FROM pgcast_take_tokens_messages_v2(%(name)s, %(want)s, %(lead)s)

-- message_feedback --
-- One SES event about a message, by the provider's message id (pgcast_message_feedback_v2; a
-- complaint also suppresses and unsubscribes the account's contact with that address).
SELECT pgcast_message_feedback_v2(%(provider_id)s, %(event)s, %(at)s, %(detail)s) AS id

-- message_learn_provider_id --
-- An `unknown` message (the provider's answer was lost) learns its provider id from an SES
-- event tagged with its id (EmailTag pgcast_message), so that the event can resolve it.
UPDATE messages SET provider_message_id = %(provider_id)s
WHERE id = %(id)s AND status = 'unknown' AND provider_message_id IS NULL

-- messages_share --
-- Set the share of a bucket's rate messages may take while broadcasts wait (more than 0, at
-- most 1: pgcast_messages_share_v2 refuses anything else, SQLSTATE 22023).
SELECT * FROM pgcast_messages_share_v2(%(name)s, %(share)s)

-- message_get_key --
-- The message an account's idempotency key names, if any.
SELECT s.* FROM message_status s JOIN messages m ON m.id = s.id
WHERE m.account = %(account)s AND m.idempotency_key = %(key)s

-- account_senders --
-- The senders one account may use (an empty array: any From).
SELECT ARRAY(SELECT s.sender FROM senders s WHERE s.account = %(account)s
             ORDER BY s.sender) AS senders

-- message_one_click_unsubscribe --
-- One-click unsubscribe from a marketing message's link: its account's contact with its
-- address, account-wide (pgcast_unsubscribe_message_v1; no row: no such marketing message).
SELECT * FROM pgcast_unsubscribe_message_v1(%(id)s)
