-- Queries of SES feedback (issue 14): the SNS webhook, suppression lists, unsuppress.

-- feedback_sns_seen --
-- Whether an SNS MessageId was already processed.
SELECT EXISTS (SELECT 1 FROM sns_messages WHERE message_id = %(message_id)s) AS seen

-- feedback_sns_record --
-- Records an SNS MessageId as processed (no row back: it already was).
INSERT INTO sns_messages (message_id, topic_arn, type, sent_at)
VALUES (%(message_id)s, %(topic)s, %(type)s, %(sent_at)s)
ON CONFLICT (message_id) DO NOTHING
RETURNING message_id

-- feedback_ses_event --
-- Applies one SES event once per SNS MessageId, and resolves the `unknown` row it names
-- (pgcast_ses_event_v3: and fails the `sent` row of a message SES could not render).
SELECT * FROM pgcast_ses_event_v3(
    %(message_id)s, %(topic)s, %(sent_at)s, %(prune_before)s, %(event)s, %(broadcast)s,
    %(contact)s, %(addresses)s, %(detail)s, %(at)s, %(soft_limit)s, %(guard_min)s,
    %(max_bounce)s, %(max_complaint)s, %(ses_message_id)s)

-- feedback_guard --
-- Pauses a sending broadcast whose bounce or complaint rate is past the limit (pgcast_guard_v1).
SELECT pgcast_guard_v1(%(id)s, %(guard_min)s, %(max_bounce)s, %(max_complaint)s) AS reason

-- feedback_suppressed_page --
-- An account's suppressed contacts, keyset-paged by id, optionally of one reason.
SELECT id, email, suppressed_at, suppressed_reason, suppressed_detail, soft_bounces,
       unsubscribed_at
FROM contacts
WHERE account = %(account)s AND suppressed_at IS NOT NULL AND id > %(after)s
  AND (%(reason)s::text IS NULL OR suppressed_reason = %(reason)s)
ORDER BY id
LIMIT %(limit)s

-- feedback_unsuppress --
-- Lifts one contact's suppression, audited (pgcast_unsuppress_v1).
SELECT * FROM pgcast_unsuppress_v1(%(account)s, %(email)s, %(source)s, %(actor)s)
