-- Queries of scheduled sends, retries and copies (shared by the CLI, the API and the sweeper).

-- broadcast_schedule --
-- draft -> scheduled at `at`, with an optional latest start (pgcast_schedule_v1).
SELECT * FROM pgcast_schedule_v1(%(account)s, %(id)s, %(at)s, %(not_after)s, %(details)s::jsonb)

-- broadcast_unschedule --
-- scheduled -> draft (pgcast_unschedule_v1).
SELECT * FROM pgcast_unschedule_v1(%(account)s, %(id)s, %(details)s::jsonb)

-- broadcast_retry --
-- A finished broadcast's failed (and, when asked, unknown) rows back to pending (pgcast_retry_v3;
-- unknown rows handed off less than `in_doubt` seconds ago stay).
SELECT * FROM pgcast_retry_v3(%(account)s, %(id)s, %(include_unknown)s, %(in_doubt)s,
                              %(details)s::jsonb)

-- broadcast_copy --
-- A new draft with another broadcast's content, segment, rate cap, priority and tracking mode.
INSERT INTO broadcasts (account, subject, from_address, text_body, html_body, segment_tag,
                        segment_filter, rate_limit, priority, track, audit_log)
SELECT b.account, b.subject, b.from_address, b.text_body, b.html_body, b.segment_tag,
       b.segment_filter, b.rate_limit, b.priority, b.track,
       pgcast_audit_v1('create', NULL, 'draft',
                       %(details)s::jsonb || jsonb_build_object('copied_from', b.id))
FROM broadcasts b
WHERE b.id = %(id)s AND b.account = %(account)s
RETURNING *

-- start_due --
-- Starts the due scheduled broadcast whose time came first, if any (pgcast_start_due_v4).
SELECT * FROM pgcast_start_due_v4()
