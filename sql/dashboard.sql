-- Queries the dashboard needs beyond the core API (api/dashboard_routes.py).

-- dashboard_audit_log --
-- One broadcast's audit log (one row by primary key), only if the account owns it.
SELECT audit_log FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- dashboard_audience --
-- How many contacts a draft would reach if sent now: the snapshot's own filter (the segment
-- tag; unconfirmed, unsubscribed and suppressed contacts left out: pgcast_mailable_v1),
-- counted without writing anything.
SELECT b.status, b.segment_tag,
       (SELECT count(*) FROM contacts c
        WHERE c.account = b.account AND pgcast_mailable_v1(c)
          AND (b.segment_tag IS NULL OR c.tags @> ARRAY[b.segment_tag])) AS audience
FROM broadcasts b
WHERE b.id = %(id)s AND b.account = %(account)s
