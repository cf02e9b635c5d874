-- 0020_tracking (issue 29): opens and clicks, per broadcast, with privacy by design.
-- * broadcasts.track: 'none' (nothing is recorded, no link is rewritten), 'aggregate'
--   (counts only: no event row names a contact) or 'contact' (per-person events). Chosen
--   at create: the broadcast's own choice, else its account's default set by the operator
--   (tracking_defaults, `pgcast tracking default`), else 'none'.
-- * broadcast_links: a broadcast's tracked links, stored once, by the first worker that
--   loads its content (pgcast_links_store_v1: every worker then reads the same table, so a
--   link's index is the same in every message whichever worker rendered it).
-- * tracking_events: one row per open or click, partitioned by month (partitions made on
--   demand by pgcast_tracking_partition_v1); contact_id only in 'contact' mode, enforced
--   here (pgcast_track_v1 drops it for any other mode). No IP address, no user agent.
-- * tracking_counts: the report's rollup (per broadcast, kind, link and hour), kept in the
--   transaction that writes the events: a report reads a few hundred rows, never the events.
-- * tracking_firsts: a contact's first human open / click (any link, and each link) of a
--   broadcast ('contact' mode only): unique counts, and the activity segments.
-- Retention drops whole months of events older than its cutoff and the firsts of archived
-- broadcasts; contacts erase (pgcast_erase_v4) deletes the contact's events and firsts.

CREATE TABLE tracking_defaults (
    account    text        PRIMARY KEY CHECK (char_length(account) BETWEEN 1 AND 200),
    mode       text        NOT NULL CHECK (mode IN ('none', 'aggregate', 'contact')),
    updated_at timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE broadcasts ADD COLUMN track text NOT NULL DEFAULT 'none'
    CHECK (track IN ('none', 'aggregate', 'contact'));

CREATE TABLE broadcast_links (
    broadcast_id uuid     NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    idx          smallint NOT NULL CHECK (idx >= 0),
    -- exactly what the template's href said, character references decoded as HTML does
    url          text     NOT NULL CHECK (octet_length(url) <= 2048),
    PRIMARY KEY (broadcast_id, idx),
    UNIQUE (broadcast_id, url)
);

CREATE TABLE tracking_events (
    at           timestamptz NOT NULL,
    broadcast_id uuid        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    CHECK ((kind = 'click') = (link IS NOT NULL)),
    contact_id   bigint,  -- 'contact' mode only
    machine      boolean     NOT NULL,
    source       text        NOT NULL CHECK (source IN ('pgcast', 'ses'))
) PARTITION BY RANGE (at);
CREATE INDEX tracking_events_broadcast ON tracking_events (broadcast_id, at);
CREATE INDEX tracking_events_contact ON tracking_events (contact_id)
    WHERE contact_id IS NOT NULL;

CREATE TABLE tracking_counts (
    broadcast_id uuid        NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    NOT NULL,  -- -1: an open, or (uniq only) a click on any link
    hour         timestamptz NOT NULL,
    total        bigint      NOT NULL DEFAULT 0,
    machine      bigint      NOT NULL DEFAULT 0,
    uniq         bigint      NOT NULL DEFAULT 0,  -- contacts whose first human event this is
    PRIMARY KEY (broadcast_id, kind, link, hour)
);

CREATE TABLE tracking_firsts (
    broadcast_id uuid        NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('open', 'click')),
    link         smallint    NOT NULL,  -- -1: an open, or a click on any link
    contact_id   bigint      NOT NULL,
    at           timestamptz NOT NULL,
    PRIMARY KEY (broadcast_id, kind, link, contact_id)
);
CREATE INDEX tracking_firsts_contact ON tracking_firsts (contact_id);

-- the report's unsubscribes of one broadcast (contact_events.broadcast_id)
CREATE INDEX contact_events_broadcast ON contact_events (broadcast_id)
    WHERE broadcast_id IS NOT NULL;

-- the partition of tracking_events that holds p_at's month (UTC), made when missing; made
-- under an advisory lock (two sessions never race to create the same table)
CREATE FUNCTION pgcast_tracking_partition_v1(p_at timestamptz)
RETURNS regclass LANGUAGE plpgsql AS $$
DECLARE
    m timestamp := date_trunc('month', p_at AT TIME ZONE 'UTC');
    name text := 'tracking_events_' || to_char(m, 'YYYYMM');
    found regclass;
BEGIN
    found := to_regclass(quote_ident(current_schema()) || '.' || name);
    IF found IS NOT NULL THEN
        RETURN found;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.tracking_partition'), 0);
    found := to_regclass(quote_ident(current_schema()) || '.' || name);
    IF found IS NULL THEN
        EXECUTE format('CREATE TABLE %I.%I PARTITION OF tracking_events '
                       'FOR VALUES FROM (%L) TO (%L)', current_schema(), name,
                       m AT TIME ZONE 'UTC', (m + interval '1 month') AT TIME ZONE 'UTC');
        found := to_regclass(quote_ident(current_schema()) || '.' || name);
    END IF;
    RETURN found;
END
$$;

-- a broadcast's tracked links: the first caller stores p_urls (index = position - 1), every
-- caller gets the stored table back. Two workers at once: the second waits on the first's
-- keys and stores nothing; workers whose lists differ (a mixed upgrade) still agree, since
-- everyone uses what is stored.
CREATE FUNCTION pgcast_links_store_v1(p_id uuid, p_urls text[])
RETURNS TABLE (idx smallint, url text) LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO broadcast_links (broadcast_id, idx, url)
    SELECT p_id, (u.i - 1)::smallint, u.url
    FROM unnest(p_urls) WITH ORDINALITY AS u(url, i)
    WHERE NOT EXISTS (SELECT 1 FROM broadcast_links l WHERE l.broadcast_id = p_id)
    ORDER BY u.i
    ON CONFLICT DO NOTHING;
    RETURN QUERY SELECT l.idx, l.url FROM broadcast_links l
                 WHERE l.broadcast_id = p_id ORDER BY l.idx;
END
$$;

-- record a batch of opens and clicks (the API's buffer, or SES events). Events commit
-- asynchronously (a crash loses at most the last moments' counts, never a redirect).
-- Lock order: the contacts named (FOR KEY SHARE, by id: an erase holding one FOR UPDATE is
-- waited for, and its deleted row then drops the event), then firsts, then rollup rows in
-- key order. A contact id is kept only for a 'contact' broadcast; events of a 'none'
-- broadcast, or of no broadcast, are dropped. Returns the events written.
CREATE FUNCTION pgcast_track_v1(p_broadcasts uuid[], p_at timestamptz[], p_kinds text[],
                                p_links smallint[], p_contacts bigint[], p_machine boolean[],
                                p_source text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    alive bigint[];
    month timestamptz;
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    FOR month IN SELECT DISTINCT date_trunc('month', a AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                 FROM unnest(p_at) AS a LOOP
        PERFORM pgcast_tracking_partition_v1(month);
    END LOOP;
    alive := ARRAY(SELECT c.id FROM contacts c
                   WHERE c.id = ANY (p_contacts) ORDER BY c.id FOR KEY SHARE);
    WITH batch AS (
        SELECT e.at, e.b AS broadcast_id, e.kind,
               CASE WHEN e.kind = 'click' THEN e.link END AS link,
               CASE WHEN b.track = 'contact' THEN e.contact END AS contact_id, e.machine
        FROM unnest(p_broadcasts, p_at, p_kinds, p_links, p_contacts, p_machine)
             AS e(b, at, kind, link, contact, machine)
        JOIN broadcasts b ON b.id = e.b AND b.track <> 'none'
        WHERE e.contact IS NULL OR b.track <> 'contact' OR e.contact = ANY (alive)
    ), written AS (
        INSERT INTO tracking_events (at, broadcast_id, kind, link, contact_id, machine, source)
        SELECT t.at, t.broadcast_id, t.kind, t.link, t.contact_id, t.machine, p_source
        FROM batch t
        RETURNING 1
    ), wanted AS (
        SELECT t.broadcast_id, t.kind, coalesce(t.link, -1)::smallint AS link, t.contact_id,
               min(t.at) AS at
        FROM batch t
        WHERE t.contact_id IS NOT NULL AND NOT t.machine
        GROUP BY 1, 2, 3, 4
        UNION ALL  -- a click on any link
        SELECT t.broadcast_id, t.kind, -1::smallint, t.contact_id, min(t.at)
        FROM batch t
        WHERE t.contact_id IS NOT NULL AND NOT t.machine AND t.kind = 'click'
        GROUP BY 1, 2, 3, 4
    ), firsts AS (
        INSERT INTO tracking_firsts (broadcast_id, kind, link, contact_id, at)
        SELECT w.broadcast_id, w.kind, w.link, w.contact_id, w.at FROM wanted w
        ORDER BY w.broadcast_id, w.kind, w.link, w.contact_id
        ON CONFLICT DO NOTHING
        RETURNING broadcast_id, kind, link, at
    ), counted AS (
        SELECT t.broadcast_id, t.kind, coalesce(t.link, -1)::smallint AS link,
               date_trunc('hour', t.at) AS hour, count(*) AS total,
               count(*) FILTER (WHERE t.machine) AS machine, 0::bigint AS uniq
        FROM batch t GROUP BY 1, 2, 3, 4
        UNION ALL
        SELECT f.broadcast_id, f.kind, f.link, date_trunc('hour', f.at), 0, 0, count(*)
        FROM firsts f GROUP BY 1, 2, 3, 4
    ), summed AS (
        SELECT c.broadcast_id, c.kind, c.link, c.hour, sum(c.total)::bigint AS total,
               sum(c.machine)::bigint AS machine, sum(c.uniq)::bigint AS uniq
        FROM counted c GROUP BY 1, 2, 3, 4
    ), rolled AS (
        INSERT INTO tracking_counts AS k (broadcast_id, kind, link, hour, total, machine, uniq)
        SELECT s.broadcast_id, s.kind, s.link, s.hour, s.total, s.machine, s.uniq
        FROM summed s
        ORDER BY s.broadcast_id, s.kind, s.link, s.hour
        ON CONFLICT (broadcast_id, kind, link, hour) DO UPDATE
        SET total = k.total + EXCLUDED.total, machine = k.machine + EXCLUDED.machine,
            uniq = k.uniq + EXCLUDED.uniq
        RETURNING 1
    )
    SELECT count(*) INTO n FROM written;
    RETURN n;
END
$$;

-- erase, v4: v3, then the contact's opens and clicks (events and firsts) in the account's
-- broadcasts, under v3's locks (the erasure lock, the contact row). The rollup's counts
-- stay: they name nobody.
CREATE FUNCTION pgcast_erase_v4(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM pgcast_erase_v3(p_account, p_email, p_source, p_actor);
    IF r.contact_id IS NOT NULL THEN
        DELETE FROM tracking_events e
        WHERE e.contact_id = r.contact_id
          AND e.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
        DELETE FROM tracking_firsts f
        WHERE f.contact_id = r.contact_id
          AND f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
    END IF;
    RETURN QUERY SELECT r.contact_id, r.recipients;
END
$$;

-- retention: drop the months of events that ended before p_before, and the firsts of
-- archived broadcasts (their recipients have left the live tables too). Returns the
-- partitions dropped.
CREATE FUNCTION pgcast_tracking_retention_v1(p_before timestamptz)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    p record;
    n integer := 0;
BEGIN
    FOR p IN
        SELECT c.oid::regclass AS part,
               (regexp_match(pg_get_expr(c.relpartbound, c.oid),
                             'TO \(''([^'']+)''\)'))[1]::timestamptz AS upper
        FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
        WHERE i.inhparent = 'tracking_events'::regclass
        ORDER BY 2
    LOOP
        CONTINUE WHEN p.upper IS NULL OR p.upper > p_before;
        EXECUTE format('DROP TABLE %s', p.part);
        n := n + 1;
    END LOOP;
    DELETE FROM tracking_firsts f
    WHERE f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.archived_at IS NOT NULL);
    RETURN n;
END
$$;
