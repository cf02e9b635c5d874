-- tracking_default_set --
-- The tracking mode an account's new broadcasts get unless they say (operator only).
INSERT INTO tracking_defaults (account, mode) VALUES (%(account)s, %(mode)s)
ON CONFLICT (account) DO UPDATE SET mode = EXCLUDED.mode, updated_at = now()
RETURNING account, mode, updated_at

-- tracking_default_get --
-- An account's default tracking mode ('none' when the operator set none).
SELECT %(account)s::text AS account,
       coalesce((SELECT mode FROM tracking_defaults WHERE account = %(account)s), 'none') AS mode

-- tracking_links_store --
-- Stores a broadcast's tracked links if nobody has (pgcast_links_store_v1); the stored ones.
SELECT idx, url FROM pgcast_links_store_v1(%(id)s, %(urls)s::text[])

-- tracking_links --
-- A broadcast's tracked links and its mode (the redirect's cache; links never change).
SELECT l.idx, l.url, b.track
FROM broadcasts b LEFT JOIN broadcast_links l ON l.broadcast_id = b.id
WHERE b.id = %(id)s
ORDER BY l.idx

-- tracking_record --
-- A batch of opens and clicks (pgcast_track_v1: events, firsts and the rollup; async commit).
SELECT pgcast_track_v1(%(broadcasts)s::uuid[], %(at)s::timestamptz[], %(kinds)s::text[],
                       %(links)s::smallint[], %(contacts)s::bigint[], %(machine)s::boolean[],
                       %(source)s) AS written

-- tracking_stats_head --
-- A broadcast's delivery counters, its mode and its unsubscribes (contact_events).
SELECT b.id, b.status, b.track, b.total, b.sent, b.delivered, b.bounced, b.complained,
       (SELECT count(DISTINCT e.contact_id) FROM contact_events e
        WHERE e.broadcast_id = b.id AND e.action = 'unsubscribe') AS unsubscribed
FROM broadcasts b WHERE b.id = %(id)s AND b.account = %(account)s

-- tracking_stats_counts --
-- The rollup of one broadcast per kind and link: totals, machine and unique (link -1: opens, or any link).
SELECT c.kind, c.link, sum(c.total)::bigint AS total, sum(c.machine)::bigint AS machine,
       sum(c.uniq)::bigint AS uniq
FROM tracking_counts c WHERE c.broadcast_id = %(id)s
GROUP BY c.kind, c.link ORDER BY c.kind, c.link

-- tracking_stats_series --
-- Opens and clicks of one broadcast per hour (human and machine).
SELECT c.hour, c.kind, sum(c.total - c.machine)::bigint AS human, sum(c.machine)::bigint AS machine
FROM tracking_counts c WHERE c.broadcast_id = %(id)s AND (c.kind = 'open' OR c.link >= 0)
GROUP BY c.hour, c.kind ORDER BY c.hour, c.kind

-- tracking_stats_links --
-- A broadcast's stored links, by index.
SELECT idx, url FROM broadcast_links WHERE broadcast_id = %(id)s ORDER BY idx

-- tracking_retention --
-- Drops the event months that ended before the cutoff and the firsts of archived broadcasts.
SELECT pgcast_tracking_retention_v1(now() - make_interval(secs => %(older_than)s)) AS partitions

