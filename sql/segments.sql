-- Saved segments and filter evaluation (issue 27). The filter compiler is the SQL function
-- pgcast_segment_sql_v2 (schema/0018_segments.sql, v2 in 0020_tracking.sql): it raises SQLSTATE PGS22 naming the
-- JSON path of what is wrong.

-- segment_check --
-- A filter compiled and validated for an account: the filter with saved segments expanded.
SELECT expanded FROM pgcast_segment_sql_v2(%(account)s, %(filter)s::jsonb)

-- segment_count --
-- How many mailable contacts of the account a filter selects.
SELECT pgcast_segment_count_v2(%(account)s, %(filter)s::jsonb) AS count

-- segment_count_limit --
-- The time a count may take, for the rest of its transaction (a tenant's filter is bounded).
SELECT set_config('statement_timeout', %(ms)s::text, true)

-- segment_save --
-- Creates or replaces a saved segment, its filter validated first (it may not refer to
-- itself, directly or through other saved segments); inserted says which.
WITH checked AS (
    SELECT expanded FROM pgcast_segment_sql_v2(%(account)s, %(filter)s::jsonb,
                                               ARRAY[%(name)s]::text[])
)
INSERT INTO segments AS s (account, name, filter)
SELECT %(account)s, %(name)s, %(filter)s::jsonb FROM checked
ON CONFLICT (account, name) DO UPDATE SET filter = excluded.filter, updated_at = now()
RETURNING s.account, s.name, s.filter, s.created_at, s.updated_at, (s.xmax = 0) AS inserted

-- segment_list --
-- An account's saved segments by name.
SELECT name, filter, created_at, updated_at FROM segments
WHERE account = %(account)s ORDER BY name

-- segment_get --
-- One saved segment.
SELECT name, filter, created_at, updated_at FROM segments
WHERE account = %(account)s AND name = %(name)s

-- segment_users --
-- What refers to a saved segment: other saved segments, and drafts or scheduled broadcasts
-- whose audience names it (a sent broadcast keeps its frozen filter and is not counted).
SELECT 'segment' AS kind, s.name AS what FROM segments s
WHERE s.account = %(account)s AND s.name <> %(name)s
  AND jsonb_path_exists(s.filter, 'strict $.** ? (@.segment == $n)',
                        jsonb_build_object('n', %(name)s::text))
UNION ALL
SELECT 'broadcast', b.id::text FROM broadcasts b
WHERE b.account = %(account)s AND b.status IN ('draft', 'scheduled')
  AND b.segment_filter IS NOT NULL
  AND jsonb_path_exists(b.segment_filter, 'strict $.** ? (@.segment == $n)',
                        jsonb_build_object('n', %(name)s::text))
ORDER BY 1, 2

-- segment_delete --
-- Deletes a saved segment; no row when there was none.
DELETE FROM segments WHERE account = %(account)s AND name = %(name)s RETURNING name
