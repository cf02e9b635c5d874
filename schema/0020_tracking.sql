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
-- broadcasts; contacts erase (pgcast_erase_v5) deletes the contact's events and firsts.

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

-- erase, v5: v4 (v3 and the account's messages, 0017), then the contact's opens and clicks
-- (events and firsts) in the account's broadcasts, under v3's locks (the erasure lock, the
-- contact row). The rollup's counts stay: they name nobody.
CREATE FUNCTION pgcast_erase_v5(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    r record;
BEGIN
    SELECT * INTO r FROM pgcast_erase_v4(p_account, p_email, p_source, p_actor);
    IF r.contact_id IS NOT NULL THEN
        DELETE FROM tracking_events e
        WHERE e.contact_id = r.contact_id
          AND e.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
        DELETE FROM tracking_firsts f
        WHERE f.contact_id = r.contact_id
          AND f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
    END IF;
    RETURN QUERY SELECT r.contact_id, r.recipients, r.messages;
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


-- Segments by activity (issue 29 with issue 27's compiler): {"opened": BROADCAST_ID} and
-- {"clicked": BROADCAST_ID} select the contacts with a human open / click of that broadcast
-- (tracking_firsts), for a broadcast that tracked in 'contact' mode; any other broadcast is
-- refused with the reason. pgcast_segment_node_v2 handles these two and the conditions that
-- hold conditions (all, any, not, segment: so they may nest anywhere), and hands every other
-- leaf to pgcast_segment_node_v1 unchanged. Callers switch to sql_v2, count_v2, contacts_v2,
-- send_v7 and start_due_v4; the v1 functions are kept (node_v1 is used by v2).
CREATE FUNCTION pgcast_segment_node_v2(p_account text, p_filter jsonb, p_path text,
                                       p_depth integer, p_seen text[],
                                       INOUT params jsonb, INOUT nodes integer,
                                       OUT predicate text, OUT expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k text;
    v jsonb;
    i integer;
    sub record;
    parts text[] := '{}';
    items jsonb := '[]';
    stored jsonb;
    mode text;
BEGIN
    IF jsonb_typeof(p_filter) IS DISTINCT FROM 'object' OR p_filter ? 'attribute'
            OR (SELECT count(*) FROM jsonb_object_keys(p_filter)) <> 1 THEN
        SELECT * INTO sub FROM pgcast_segment_node_v1(p_account, p_filter, p_path, p_depth,
                                                      p_seen, params, nodes);
        params := sub.params; nodes := sub.nodes;
        predicate := sub.predicate; expanded := sub.expanded;
        RETURN;
    END IF;
    k := (SELECT jsonb_object_keys(p_filter) LIMIT 1);
    v := p_filter -> k;
    IF k NOT IN ('all', 'any', 'not', 'segment', 'opened', 'clicked') THEN
        SELECT * INTO sub FROM pgcast_segment_node_v1(p_account, p_filter, p_path, p_depth,
                                                      p_seen, params, nodes);
        params := sub.params; nodes := sub.nodes;
        predicate := sub.predicate; expanded := sub.expanded;
        RETURN;
    END IF;
    -- the limits node_v1 checks for every node
    IF p_depth > 10 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too deep: at most 10 levels of nesting');
    END IF;
    nodes := nodes + 1;
    IF nodes > 200 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too large: at most 200 conditions');
    END IF;
    expanded := p_filter;
    CASE k
    WHEN 'all', 'any' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'array' OR jsonb_array_length(v) > 100 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'must be a list of at most 100 conditions');
        END IF;
        IF jsonb_array_length(v) = 0 THEN
            predicate := CASE k WHEN 'all' THEN 'true' ELSE 'false' END;
            RETURN;
        END IF;
        FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
            SELECT * INTO sub FROM pgcast_segment_node_v2(
                p_account, v -> i, format('%s.%s[%s]', p_path, k, i), p_depth + 1, p_seen,
                params, nodes);
            params := sub.params;
            nodes := sub.nodes;
            parts := parts || sub.predicate;
            items := items || jsonb_build_array(sub.expanded);
        END LOOP;
        predicate := '(' || array_to_string(parts, CASE k WHEN 'all' THEN ' AND ' ELSE ' OR ' END)
                     || ')';
        expanded := jsonb_build_object(k, items);
    WHEN 'not' THEN
        SELECT * INTO sub FROM pgcast_segment_node_v2(
            p_account, v, p_path || '.not', p_depth + 1, p_seen, params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := '(NOT ' || sub.predicate || ')';
        expanded := jsonb_build_object('not', sub.expanded);
    WHEN 'segment' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'must be a segment name');
        END IF;
        IF (v #>> '{}') = ANY (p_seen) THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment', 'saved segment '
                || (v #>> '{}') || ' refers to itself (' || array_to_string(p_seen, ' -> ')
                || ' -> ' || (v #>> '{}') || ')');
        END IF;
        SELECT s.filter INTO stored FROM segments s
        WHERE s.account = p_account AND s.name = (v #>> '{}');
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.segment',
                                            'no saved segment ' || (v #>> '{}'));
        END IF;
        SELECT * INTO sub FROM pgcast_segment_node_v2(
            p_account, stored, p_path || '.segment(' || (v #>> '{}') || ')', p_depth + 1,
            p_seen || (v #>> '{}'), params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := sub.predicate;
        expanded := sub.expanded;
    ELSE  -- opened, clicked
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~*
                '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'must be a broadcast id');
        END IF;
        SELECT b.track INTO mode FROM broadcasts b
        WHERE b.id = (v #>> '{}')::uuid AND b.account = p_account;
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'no broadcast ' || (v #>> '{}') || ' in this account');
        END IF;
        IF mode IS DISTINCT FROM 'contact' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                'broadcast ' || (v #>> '{}') || ' did not track opens and clicks per contact '
                || '(its tracking mode is ' || coalesce(mode, 'none') || '; only a broadcast '
                || 'sent with --track contact can be a segment by activity)');
        END IF;
        params := params || jsonb_build_array(v);
        -- a semi-join over the broadcast's firsts (contact_id is never NULL)
        predicate := format('(c.id IN (SELECT f.contact_id FROM tracking_firsts f'
                            ' WHERE f.broadcast_id = ($1->>%s)::uuid AND f.kind = %L'
                            ' AND f.link = -1))', jsonb_array_length(params) - 1,
                            CASE k WHEN 'opened' THEN 'open' ELSE 'click' END);
    END CASE;
END
$$;

-- A filter compiled (v2: v1 with the activity conditions, through pgcast_segment_node_v2): the predicate over `contacts c` (values only from the bound $1), the
-- jsonb array to bind as $1, and the filter with saved segments expanded (what a send
-- freezes). Raises PGS22 naming the JSON path of anything unknown or invalid. p_seen: the
-- saved segments that must not be referred to (a segment being saved: itself).
CREATE FUNCTION pgcast_segment_sql_v2(p_account text, p_filter jsonb,
                                      p_seen text[] DEFAULT '{}')
RETURNS TABLE (predicate text, params jsonb, expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    IF p_filter IS NULL OR octet_length(p_filter::text) > 16384 THEN
        PERFORM pgcast_segment_error_v1('$', 'a filter is a JSON object of at most 16 KiB');
    END IF;
    SELECT * INTO r FROM pgcast_segment_node_v2(p_account, p_filter, '$', 1, p_seen,
                                                '[]'::jsonb, 0);
    RETURN QUERY SELECT r.predicate, r.params, r.expanded;
END
$$;

-- v2: through pgcast_segment_sql_v2. The mailable contacts of an account a filter selects (for DBAs, and the tests).
CREATE FUNCTION pgcast_segment_contacts_v2(p_account text, p_filter jsonb)
RETURNS SETOF contacts
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, p_filter);
    RETURN QUERY EXECUTE 'SELECT c.* FROM contacts c WHERE c.account = $2'
                         ' AND pgcast_mailable(c) AND ' || s.predicate
        USING s.params, p_account;
END
$$;

-- v2: through pgcast_segment_sql_v2. How many mailable contacts of an account a filter selects (`segment count`).
CREATE FUNCTION pgcast_segment_count_v2(p_account text, p_filter jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
    n bigint;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, p_filter);
    EXECUTE 'SELECT count(*) FROM contacts c WHERE c.account = $2'
            ' AND pgcast_mailable(c) AND ' || s.predicate
        INTO n USING s.params, p_account;
    RETURN n;
END
$$;

-- send, v7: v6 with the filter compiled by pgcast_segment_sql_v2 (activity conditions).
CREATE FUNCTION pgcast_send_v7(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
                               p_details jsonb DEFAULT '{}')
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
    s record;
BEGIN
    -- an acknowledged send is not lost to a crash, whatever the server's setting
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status NOT IN ('draft', 'scheduled') THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_segment_sql_v2(p_account, pgcast_broadcast_filter_v1(b));
    part := pgcast_partition_create_v3(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked) and contacts.id is
    -- unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $3, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND pgcast_mailable(c) AND %s', part, s.predicate)
        USING s.params, p_account, p_id;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        PERFORM pgcast_partition_attach_v2(p_id);
    ELSE
        EXECUTE format('DROP TABLE %s', part);  -- nobody to send to: no partition
        IF NOT p_allow_empty THEN
            RETURN QUERY SELECT false, 'empty'::text, 0;
            RETURN;
        END IF;
    END IF;
    IF b.rate_limit IS NOT NULL THEN
        INSERT INTO rate_limits (name, rate, burst, tokens)
        VALUES ('broadcast:' || p_id, b.rate_limit, greatest(1, ceil(b.rate_limit / 10)), 1)
        ON CONFLICT (name) DO NOTHING;
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
        total = n,
        filter_used = s.expanded,
        started_at = now(),
        finished_at = CASE WHEN n = 0 THEN now() END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('send', u.status,
            CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
            coalesce(p_details, '{}'::jsonb)
            || jsonb_build_object('recipients', n, 'filter', s.expanded))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft', 'scheduled'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

-- start, v4: v3 through pgcast_send_v7.
CREATE FUNCTION pgcast_start_due_v4()
RETURNS TABLE (broadcast_id uuid, status text, queued integer, reason text,
               lateness_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b record;
    s record;
    late double precision;
    why text;
    started jsonb;
    c record;
    picked boolean := false;
BEGIN
    -- a start that failed is as durable as one that sent (send_v7 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the erasure lock before the broadcast row, as every path takes them (see v2)
    FOR c IN
        SELECT d.id, d.account FROM broadcasts d
        WHERE d.status = 'scheduled' AND d.scheduled_at <= now()
        ORDER BY d.scheduled_at
        LIMIT 10
    LOOP
        CONTINUE WHEN NOT pg_try_advisory_xact_lock_shared(hashtext('pgcast.erasure'),
                                                            hashtext(c.account));
        SELECT d.id, d.account, d.scheduled_at, d.not_after INTO b
        FROM broadcasts d
        WHERE d.id = c.id AND d.status = 'scheduled' AND d.scheduled_at <= now()
        FOR UPDATE SKIP LOCKED;
        picked := FOUND;
        EXIT WHEN picked;
    END LOOP;
    IF NOT picked THEN
        RETURN;
    END IF;
    late := round(extract(epoch FROM now() - b.scheduled_at), 3);
    started := jsonb_build_object('via', 'schedule', 'scheduled_at', b.scheduled_at,
                                  'not_after', b.not_after, 'started_at', now(),
                                  'lateness_seconds', late);
    IF b.not_after IS NOT NULL AND now() > b.not_after THEN
        why := 'missed_window';
    ELSE
        BEGIN
            SELECT * INTO s FROM pgcast_send_v7(b.account, b.id, false, started);
        EXCEPTION WHEN SQLSTATE 'PGS22' THEN
            why := 'invalid_segment';
            started := started || jsonb_build_object('error', SQLERRM);
        END;
        IF why IS NULL THEN  -- (s is unassigned when the send raised)
            IF s.ok THEN
                RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
                RETURN;
            END IF;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := coalesce(why, 'empty_segment');
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = 'failed', failed_reason = why, finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('start', u.status, 'failed',
            started || jsonb_build_object('reason', why))
    WHERE u.id = b.id AND u.status = ANY (ARRAY['scheduled'])
    RETURNING u.id, u.status, 0, why, late;
END
$$;
