-- 0012_erasure_races (issue 24): an erasure holds whatever runs at the same time.
-- * The erasure lock, the advisory lock (pgcast.erasure, account): exclusive in the erase,
--   shared by every writer that could bring an address back (an import or POST /contacts,
--   pgcast_contacts_upsert_v1; a send's snapshot, pgcast_send_v5) while it checks the
--   erased hashes and writes. Each takes it before anything else and reads in statements
--   that begin after it, so either the erase sees what the writer committed, or the writer
--   sees the erase's hash (0011's upsert checked the hash in a snapshot taken before it
--   waited on the contact the erase was deleting, and inserted the address again).
-- * An import locks the existing contacts it will update, in id order, before any fence
--   trigger fires (pgcast_contacts_lock_v1): 0011's ON CONFLICT locked row N+1 after the
--   trigger of row N had taken the contacts fence, and deadlocked with a one-click
--   unsubscribe or an SES complaint of row N+1.
-- * The erase (pgcast_erase_v3) also reaches a partition that retention has detached but
--   not yet archived (it waits for an archive in progress on the broadcast row), the SES
--   diagnostics kept in contact_events, and test sends to the address (their rows and the
--   'test' entries of the broadcasts' audit logs).
-- * A recipient row whose address was erased never gets error text back (a trigger: SES
--   error texts quote the address; a record that arrives after the erase wrote it back).
-- * The hash kept of an erased address is keyed (erasure_keys), as docs/design.md says.

-- The key of the erased-address hashes, generated here and never shown: contact_erasures
-- keeps sha256(k2 || sha256(k1 || sha256(lower(address)))), so its rows alone (a dump, a
-- copy of the table) cannot be checked against a list of addresses. 0009's rows were plain
-- SHA-256s; this migration keys them.
CREATE TABLE erasure_keys (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    k1         bytea       NOT NULL
        DEFAULT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
    k2         bytea       NOT NULL
        DEFAULT uuid_send(gen_random_uuid()) || uuid_send(gen_random_uuid()),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO erasure_keys DEFAULT VALUES;

-- Whether an address was erased from an account (its keyed hash is kept): the checks of one
-- address at a time. The import's bulk check spells the hash in its own query, where the
-- planner can join it.
CREATE FUNCTION pgcast_erased_v1(p_account text, p_address text)
RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                   WHERE e.account = p_account
                     AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                         convert_to(lower(btrim(p_address)), 'UTF8')))))
$$;
UPDATE contact_erasures e SET email_hash = sha256(k.k2 || sha256(k.k1 || e.email_hash))
FROM erasure_keys k;

-- The existing contacts of an import (lower-cased addresses), locked in id order under the
-- erasure lock (shared): the first step of every import, before any row is written, so that
-- no fence trigger fires before the last contact row is held. Returns how many were locked.
CREATE FUNCTION pgcast_contacts_lock_v1(p_account text, p_keys text[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    ids bigint[];
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    ids := ARRAY(SELECT c.id FROM contacts c
                 WHERE c.account = p_account AND lower(c.email) = ANY (p_keys)
                 ORDER BY c.id FOR UPDATE);
    RETURN cardinality(ids);
END
$$;

-- upsert contacts from a jsonb array (0011's contacts_upsert statement, as a function): the
-- erasure lock and the existing rows first (pgcast_contacts_lock_v1), then, in a snapshot
-- taken after them, the erased addresses are left out and the rest inserted or updated. An
-- empty name or tags keeps what is stored and attributes merge, unless p_replace; never
-- clears an unsubscribe or a suppression (each one added is appended to contact_events,
-- source 'import'). Returns each written address and whether it is new.
CREATE FUNCTION pgcast_contacts_upsert_v1(p_account text, p_rows jsonb, p_replace boolean)
RETURNS TABLE (email text, inserted boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM pgcast_contacts_lock_v1(p_account, ARRAY(
        SELECT lower(j.email) FROM jsonb_to_recordset(p_rows) AS j(email text)));
    RETURN QUERY
    WITH x AS (
        SELECT x.*
        FROM ROWS FROM (jsonb_to_recordset(p_rows)
                        AS (email text, name text, tags text[], attributes jsonb,
                            unsubscribed_at timestamptz, suppressed_reason text))
             WITH ORDINALITY AS x(email, name, tags, attributes, unsubscribed_at,
                                  suppressed_reason, n)
        WHERE NOT EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                          WHERE e.account = p_account
                            AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                                convert_to(lower(x.email), 'UTF8')))))
    ),
    -- the stored contacts as they were before this statement (every CTE reads one snapshot)
    stored AS (
        SELECT k.id, k.unsubscribed_at, k.suppressed_at FROM contacts k JOIN x
            ON k.account = p_account AND lower(k.email) = lower(x.email)
    ),
    up AS (
        INSERT INTO contacts AS c (account, email, name, tags, attributes, unsubscribed_at,
                                   suppressed_at, suppressed_reason)
        SELECT p_account, x.email, coalesce(x.name, ''), coalesce(x.tags, '{}'),
               coalesce(x.attributes, '{}'), x.unsubscribed_at,
               CASE WHEN x.suppressed_reason IS NOT NULL THEN clock_timestamp() END,
               x.suppressed_reason
        FROM x
        ORDER BY x.n  -- new contacts get their ids in the order given
        ON CONFLICT (account, lower(email)) DO UPDATE
        SET email = EXCLUDED.email,
            name = CASE WHEN p_replace OR EXCLUDED.name <> '' THEN EXCLUDED.name
                        ELSE c.name END,
            tags = CASE WHEN p_replace OR cardinality(EXCLUDED.tags) > 0 THEN EXCLUDED.tags
                        ELSE c.tags END,
            attributes = CASE WHEN p_replace THEN EXCLUDED.attributes
                              ELSE c.attributes || EXCLUDED.attributes END,
            unsubscribed_at = coalesce(c.unsubscribed_at, EXCLUDED.unsubscribed_at),
            suppressed_at = coalesce(c.suppressed_at, EXCLUDED.suppressed_at),
            suppressed_reason = coalesce(c.suppressed_reason, EXCLUDED.suppressed_reason),
            updated_at = now()
        RETURNING c.id, c.email, (c.xmax = 0) AS inserted, c.unsubscribed_at,
                  c.suppressed_at, c.suppressed_reason
    ),
    events AS (
        INSERT INTO contact_events (account, contact_id, action, source, details)
        SELECT p_account, up.id, 'unsubscribe', 'import', '{}'::jsonb
        FROM up LEFT JOIN stored b ON b.id = up.id
        WHERE up.unsubscribed_at IS NOT NULL AND b.unsubscribed_at IS NULL
        UNION ALL
        SELECT p_account, up.id, 'suppress', 'import',
               jsonb_build_object('reason', up.suppressed_reason)
        FROM up LEFT JOIN stored b ON b.id = up.id
        WHERE up.suppressed_at IS NOT NULL AND b.suppressed_at IS NULL
    )
    SELECT up.email, up.inserted FROM up;
END
$$;

-- send: draft|scheduled -> sending, with the snapshot of the mailable contacts of the
-- segment in the broadcast's own partition, in one transaction. Nobody to send to: refused
-- with status 'empty' and nothing changed, unless p_allow_empty (then 'sent' at once).
-- p_details joins the audit entry (who sent it, a schedule's lateness).
-- v5: v4 under the erasure lock (shared), taken first: an erase that committed before has
-- deleted its contact when the snapshot is read; one that comes later waits for the send
-- to commit, then scrubs the new partition like any other (0011: the erase found no row
-- in the uncommitted partition, and the address stayed there in clear).
CREATE FUNCTION pgcast_send_v5(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
                               p_details jsonb DEFAULT '{}')
RETURNS TABLE (ok boolean, status text, queued integer)
LANGUAGE plpgsql AS $$
DECLARE
    b broadcasts%ROWTYPE;
    n integer;
    part text;
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
    part := pgcast_partition_create_v3(p_id);
    -- no ON CONFLICT and no key yet: the broadcast is new (locked) and contacts.id is
    -- unique, so a conflict cannot happen; the key is built after the rows are in
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $1, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL'
        '   AND ($3::text IS NULL OR c.tags @> ARRAY[$3::text])', part)
        USING p_id, p_account, b.segment_tag;
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
        started_at = now(),
        finished_at = CASE WHEN n = 0 THEN now() END,
        updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('send', u.status,
            CASE WHEN n = 0 THEN 'sent' ELSE 'sending' END,
            coalesce(p_details, '{}'::jsonb) || jsonb_build_object('recipients', n))
    WHERE u.id = p_id AND u.status = ANY (ARRAY['draft', 'scheduled'])
    RETURNING true, u.status, u.total;
    IF n > 0 THEN
        PERFORM pgcast_notify_v1('send', p_id, b.epoch);
    END IF;
END
$$;

-- start: the due scheduled broadcast whose time came first, started through the send
-- function in the caller's one transaction; no row when none is due. The sweeper calls it
-- until it answers nothing, one broadcast per transaction. SKIP LOCKED: concurrent
-- sweepers each take another broadcast (or none), and the send's compare-and-set on the
-- locked row makes every start happen once. The due rows come from the
-- broadcasts_scheduled index, in time order: O(due). A start later than not_after ends the
-- broadcast failed (missed_window); one whose segment has nobody mailable at its start ends
-- failed (empty_segment). The audit entry of the start records scheduled_at, started_at
-- and the lateness.
-- v2: through pgcast_send_v5, and the erasure lock (tried, shared) before the broadcast's
-- row, as every path: the erase can wait for a scheduled broadcast's row (a test entry of its
-- audit log may name the address), so a start that held the row while it waited for the lock
-- deadlocked with it. A due broadcast of an account an erase holds waits for the next sweep.
CREATE FUNCTION pgcast_start_due_v2()
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
    -- a start that failed is as durable as one that sent (send_v5 pins the same)
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the erasure lock before the broadcast row, as every path takes them: an erase holds
    -- the lock and may wait for this broadcast's row (its audit log can name the address in
    -- a test entry), so the row is never held while waiting for the lock. A due broadcast
    -- of an account an erase holds is left to the next sweep (never waited for).
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
        SELECT * INTO s FROM pgcast_send_v5(b.account, b.id, false, started);
        IF s.ok THEN
            RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
            RETURN;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := 'empty_segment';
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

-- erase, v3: remove one address of an account from everything pgcast keeps; keep its hash.
-- Lock order: the erasure lock (exclusive: imports and sends of the account wait, and every
-- statement below reads what they committed), the contact row, the contacts fence, the
-- broadcasts whose audit log names the address in a test send, the contact's recipient
-- rows (one per broadcast), then each broadcast whose partition
-- retention has detached but not archived (FOR KEY SHARE: the archive's FOR UPDATE waits,
-- or is waited for, and its rows are then scrubbed in the archive). Scrubbed: the live
-- recipient rows, those detached partitions, the archive, the SES diagnostics of the
-- contact's events, and test sends to or as the address (rows and audit entries). recipients: rows scrubbed (live,
-- detached and archived). An address that is no contact (any more) is still scrubbed from
-- the archive and the test sends.
CREATE FUNCTION pgcast_erase_v3(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    addr text := lower(btrim(p_email));
    cid bigint;
    gone text;
    n bigint := 0;
    m bigint;
    d record;
    part regclass;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.erasure'), hashtext(p_account));
    INSERT INTO contact_erasures (account, email_hash)
    SELECT p_account, sha256(k.k2 || sha256(k.k1 || sha256(convert_to(addr, 'UTF8'))))
    FROM erasure_keys k
    ON CONFLICT DO NOTHING;
    SELECT c.id INTO cid FROM contacts c
    WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
    IF cid IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(p_account));
    END IF;
    -- test sends to the address, or rendered as its contact: their rows, and the 'test'
    -- entries of the broadcasts' audit logs (broadcast rows before recipient rows)
    -- a test send to the address not yet taken by a worker is withdrawn (never sent to the
    -- placeholder); the worker takes only queued ones
    UPDATE test_sends t
    SET to_address = CASE WHEN lower(t.to_address) = addr THEN 'erased@erased.invalid'
                          ELSE t.to_address END,
        contact_email = CASE WHEN lower(t.contact_email) = addr THEN NULL
                             ELSE t.contact_email END,
        status = CASE WHEN t.status = 'queued' THEN 'failed' ELSE t.status END,
        error = CASE WHEN t.status = 'queued' THEN 'withdrawn: an address was erased' END,
        finished_at = CASE WHEN t.status = 'queued' THEN clock_timestamp()
                           ELSE t.finished_at END
    WHERE t.account = p_account AND (lower(t.to_address) = addr OR lower(t.contact_email) = addr);
    UPDATE broadcasts b
    SET audit_log = (
        SELECT jsonb_agg(CASE WHEN a.e->>'action' = 'test' THEN jsonb_set(jsonb_set(a.e,
                   '{details,to}', coalesce((
                       SELECT jsonb_agg(CASE WHEN lower(t.v #>> '{}') = addr
                                             THEN to_jsonb('erased@erased.invalid'::text)
                                             ELSE t.v END ORDER BY t.i)
                       FROM jsonb_array_elements(a.e->'details'->'to')
                            WITH ORDINALITY AS t(v, i)), '[]'::jsonb)),
                   '{details,contact}',
                   CASE WHEN lower(a.e->'details'->>'contact') = addr THEN 'null'::jsonb
                        ELSE coalesce(a.e->'details'->'contact', 'null'::jsonb) END)
                   ELSE a.e END ORDER BY a.i)
        FROM jsonb_array_elements(b.audit_log) WITH ORDINALITY AS a(e, i))
    WHERE b.account = p_account AND strpos(lower(b.audit_log::text), addr) > 0
      AND b.audit_log @> '[{"action": "test"}]';
    IF cid IS NOT NULL THEN
        gone := 'erased-' || cid || '@erased.invalid';
        UPDATE broadcast_recipients r
        SET email = gone, last_error = NULL
        WHERE r.contact_id = cid
          AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = r.broadcast_id
                      AND b.account = p_account);
        GET DIAGNOSTICS n = ROW_COUNT;
        -- partitions detached by retention (or half-detached) and not archived yet: no
        -- longer part of broadcast_recipients, not in the archive either
        FOR d IN
            SELECT b.id FROM broadcasts b
            WHERE b.account = p_account AND b.archived_at IS NULL
              AND to_regclass(pgcast_partition_name_v1(b.id)) IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM pg_inherits i
                              WHERE i.inhrelid = to_regclass(pgcast_partition_name_v1(b.id))
                                AND NOT i.inhdetachpending)
            ORDER BY b.id
        LOOP
            -- an archive of it in progress holds the row FOR UPDATE: once it commits, the
            -- broadcast is archived and its rows are scrubbed in the archive below
            PERFORM 1 FROM broadcasts b WHERE b.id = d.id AND b.archived_at IS NULL
            FOR KEY SHARE;
            CONTINUE WHEN NOT FOUND;
            part := to_regclass(pgcast_partition_name_v1(d.id));
            CONTINUE WHEN part IS NULL;
            EXECUTE format('UPDATE %s SET email = $1, last_error = NULL WHERE contact_id = $2',
                           part) USING gone, cid;
            GET DIAGNOSTICS m = ROW_COUNT;
            n := n + m;
        END LOOP;
        UPDATE contact_events e SET details = e.details - 'detail'
        WHERE e.account = p_account AND e.contact_id = cid AND e.details ? 'detail';
    END IF;
    -- and the archive, by address (its index), after the waits above
    UPDATE broadcast_recipients_archive a
    SET email = 'erased-' || a.contact_id || '@erased.invalid', last_error = NULL
    WHERE a.broadcast_id IN (SELECT b.id FROM broadcasts b
                             WHERE b.account = p_account AND b.archived_at IS NOT NULL)
      AND lower(a.email) = addr;
    GET DIAGNOSTICS m = ROW_COUNT;
    n := n + m;
    IF cid IS NOT NULL THEN
        DELETE FROM contacts c WHERE c.id = cid;
        INSERT INTO contact_events (account, contact_id, action, source, actor)
        VALUES (p_account, cid, 'erase', p_source, coalesce(p_actor, '{}'::jsonb));
    END IF;
    RETURN QUERY SELECT cid, n;
END
$$;

-- A recipient row whose address was erased keeps no error text: whoever writes one (a
-- record that arrives after the erase, with an SES text quoting the address), a fixed text
-- is stored instead. Fires only for the rare rows the erase rewrote.
CREATE FUNCTION pgcast_erased_error_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.last_error := 'contact erased: error text not kept';
    RETURN NEW;
END
$$;
CREATE TRIGGER broadcast_recipients_erased_error
    BEFORE UPDATE OF last_error ON broadcast_recipients
    FOR EACH ROW
    WHEN (NEW.last_error IS NOT NULL
          AND NEW.email = 'erased-' || NEW.contact_id || '@erased.invalid'
          AND NEW.last_error NOT IN ('contact erased', 'contact erased: error text not kept'))
    EXECUTE FUNCTION pgcast_erased_error_v1();

DROP FUNCTION pgcast_start_due_v1();
DROP FUNCTION pgcast_send_v4(text, uuid, boolean, jsonb);
DROP FUNCTION pgcast_erase_v2(text, text, text, jsonb);
