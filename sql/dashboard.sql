-- Queries the dashboard needs beyond the core API (api/dashboard_routes.py).

-- dashboard_audit_log --
-- One broadcast's audit log (one row by primary key), only if the account owns it.
SELECT audit_log FROM broadcasts WHERE id = %(id)s AND account = %(account)s

-- dashboard_audience --
-- How many contacts a draft would reach if sent now: the snapshot's own filter (its segment
-- filter or tag, compiled by pgcast_segment_sql_v2; contacts not mailable left out), counted
-- without writing anything (PGS22 when the filter no longer compiles).
SELECT b.status, b.segment_tag,
       pgcast_segment_count_v2(b.account, pgcast_broadcast_filter_v1(b)) AS audience
FROM broadcasts b
WHERE b.id = %(id)s AND b.account = %(account)s
