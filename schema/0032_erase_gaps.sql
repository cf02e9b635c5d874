-- 0032_erase_gaps: gaps the team documented and left open around the erase.
-- * pgcast_send_message inside a caller's transaction deadlocked with an erase when the
--   caller had touched pgcast's contacts first (docs/messages.md): pgcast_erase_v6 waited for
--   the erased contact's row and the account's contacts fence while it held the erasure lock
--   (exclusive), and the caller, holding that row or that fence, then waited for the erasure
--   lock (shared). pgcast_erase_v7 never waits long while it holds something: it takes the
--   erasure lock (waiting for it holding nothing), then waits at most 100 ms in all (half of
--   deadlock_timeout, if less) for the contact row, the fence and the rows of the broadcasts
--   and saved segments it rewrites; past that, it lets everything go (the rollback of a
--   block), waits for the one that was busy holding nothing, lets it go and starts again; a
--   deadlock Postgres resolves against it while it rewrites rolls it back and starts it again.
--   A caller's lock_timeout bounds the erase's whole wait (SQLSTATE 55P03), so an API request
--   never waits longer than it said.
-- * An erase left the address in filters: a saved segment, a draft's or scheduled broadcast's
--   filter, a sent broadcast's filter_used and the send's audit entry can hold it as a value
--   (`{"attribute": "referrer", "eq": "ann@example.com"}`). v7 rewrites each condition that
--   names the address (pgcast_segment_scrub_v1) so that the address is gone and the value
--   selects nobody, and records it in the audit log of the segment (a new column) or of the
--   broadcast.

-- Each condition of a filter that names p_addr (a lower-case address; a text without @ names
-- nothing) in a string value, or as an attribute's name (ignoring case, anywhere in the
-- string), rewritten as if its value
-- were one no contact has: `in` loses the values that name it ({"any": []} when none is left),
-- `ne` becomes {"not": {"any": []}} (everyone), any other condition {"any": []} (nobody).
-- all, any and not are rewritten inside; everything else is returned as it is.
CREATE FUNCTION pgcast_segment_scrub_v1(p_filter jsonb, p_addr text)
RETURNS jsonb LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    k text;
    kept jsonb;
BEGIN
    IF p_filter IS NULL OR jsonb_typeof(p_filter) <> 'object'
       OR strpos(coalesce(p_addr, ''), '@') = 0 THEN
        RETURN p_filter;
    END IF;
    FOREACH k IN ARRAY ARRAY['all', 'any'] LOOP
        IF p_filter ? k AND jsonb_typeof(p_filter -> k) = 'array' THEN
            RETURN p_filter || jsonb_build_object(k, coalesce(
                (SELECT jsonb_agg(pgcast_segment_scrub_v1(e, p_addr) ORDER BY i)
                 FROM jsonb_array_elements(p_filter -> k) WITH ORDINALITY AS t(e, i)),
                '[]'::jsonb));
        END IF;
    END LOOP;
    IF p_filter ? 'not' THEN
        RETURN p_filter || jsonb_build_object('not',
                                              pgcast_segment_scrub_v1(p_filter -> 'not', p_addr));
    END IF;
    -- a condition: does any of its strings name the address?
    IF NOT EXISTS (SELECT 1 FROM jsonb_path_query(p_filter, 'strict $.**') AS v
                   WHERE jsonb_typeof(v) = 'string' AND strpos(lower(v #>> '{}'), p_addr) > 0)
    THEN
        RETURN p_filter;
    END IF;
    IF strpos(lower(coalesce(p_filter ->> 'attribute', '')), p_addr) = 0 THEN
        IF jsonb_typeof(p_filter -> 'in') = 'array' THEN
            kept := coalesce((SELECT jsonb_agg(e ORDER BY i)
                              FROM jsonb_array_elements(p_filter -> 'in')
                                   WITH ORDINALITY AS t(e, i)
                              WHERE jsonb_typeof(e) <> 'string'
                                 OR strpos(lower(e #>> '{}'), p_addr) = 0), '[]'::jsonb);
            IF jsonb_array_length(kept) > 0 THEN
                RETURN p_filter || jsonb_build_object('in', kept);
            END IF;
        ELSIF p_filter ? 'ne' THEN
            RETURN '{"not": {"any": []}}'::jsonb;
        END IF;
    END IF;
    RETURN '{"any": []}'::jsonb;
END
$$;

ALTER TABLE segments ADD COLUMN audit_log jsonb NOT NULL DEFAULT '[]';

-- erase, v7: v6 (v3's scrub, the messages, opens and clicks) after taking, in this order, the
-- erasure lock (exclusive), the contact row, the contacts fence (v3's locks), then the rows of
-- the account's broadcasts whose audit log or filters name the address (in id order) and of
-- its saved segments whose filter names it (in name order), waiting for them at most 100 ms in
-- all (or half of deadlock_timeout) while it holds the erasure lock; past that it lets every
-- one go, waits for the busy one holding nothing, and starts again. After v6, the filters:
-- each saved segment and broadcast whose segment_filter, filter_used or a send's audit entry
-- (details.filter) names the address (a text with @) is rewritten (pgcast_segment_scrub_v1)
-- and gets an audit entry {"action": "erase", "details": {"scrubbed": [the columns],
-- "source", the actor}} (never the address). If Postgres picks it in a deadlock while it
-- rewrites (another row it rewrites, held by a transaction that then waits for the erasure
-- lock), all it did is rolled back and it starts again. segments: how many saved segments
-- were rewritten. The caller's lock_timeout, when set, bounds the whole wait for those locks
-- (SQLSTATE 55P03).
CREATE FUNCTION pgcast_erase_v7(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint, segments bigint)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := lower(btrim(p_email));
    -- only an address is looked for in filters (strpos: a short text would match everywhere)
    is_address boolean := strpos(lower(btrim(p_email)), '@') > 0;
    caller_timeout text := current_setting('lock_timeout');
    deadline timestamptz;
    budget interval := least(interval '100 ms',
                             current_setting('deadlock_timeout')::interval / 2);
    holding_until timestamptz;
    busy text;
    cid bigint;
    v record;
    seg bigint;
    ids uuid[];
    entry jsonb;
BEGIN
    IF caller_timeout::interval > interval '0' THEN
        deadline := clock_timestamp() + caller_timeout::interval;
    END IF;
    LOOP
        IF busy IS NOT NULL AND deadline IS NOT NULL AND clock_timestamp() >= deadline THEN
            RAISE EXCEPTION 'the erase waited lock_timeout (%) for a lock (%)',
                caller_timeout, busy USING ERRCODE = 'lock_not_available';
        END IF;
        IF busy IS NOT NULL AND busy <> 'rewrite' THEN
            -- wait, holding nothing, until what was busy is free; the block's rollback lets it
            -- go again (after a deadlock of the rewrite: straight back to the erasure lock)
            BEGIN
                PERFORM set_config('lock_timeout', CASE WHEN deadline IS NULL THEN '0'
                    ELSE greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp())
                                          * 1000))::text || 'ms' END, true);
                IF busy = 'contact row' THEN
                    PERFORM 1 FROM contacts c
                    WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
                ELSIF busy = 'contacts fence' THEN
                    PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'),
                                                  hashtext(p_account));
                ELSIF busy = 'broadcast rows' THEN
                    PERFORM 1 FROM broadcasts b
                    WHERE b.account = p_account
                      AND ((strpos(lower(b.audit_log::text), addr) > 0
                            AND (b.audit_log @> '[{"action": "test"}]' OR is_address))
                           OR (is_address AND (strpos(lower(b.segment_filter::text), addr) > 0
                               OR strpos(lower(b.filter_used::text), addr) > 0)))
                    ORDER BY b.id FOR UPDATE;
                ELSE
                    PERFORM 1 FROM segments s
                    WHERE s.account = p_account
                      AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter
                    ORDER BY s.name FOR UPDATE;
                END IF;
                RAISE EXCEPTION 'let go' USING ERRCODE = 'PGC01';
            EXCEPTION WHEN SQLSTATE 'PGC01' THEN
                NULL;
            END;
        END IF;
        BEGIN
            busy := 'erasure lock';
            PERFORM set_config('lock_timeout', CASE WHEN deadline IS NULL THEN '0'
                ELSE greatest(1, ceil(extract(epoch FROM deadline - clock_timestamp())
                                      * 1000))::text || 'ms' END, true);
            PERFORM pg_advisory_xact_lock(hashtext('pgcast.erasure'), hashtext(p_account));
            -- held: the erasure lock; from here on, waits of `budget` in all
            holding_until := clock_timestamp() + budget;
            IF deadline IS NOT NULL THEN
                holding_until := least(holding_until, deadline);
            END IF;
            busy := 'contact row';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            SELECT c.id INTO cid FROM contacts c
            WHERE c.account = p_account AND lower(c.email) = addr FOR UPDATE;
            IF cid IS NOT NULL THEN
                busy := 'contacts fence';
                PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                    holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
                PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(p_account));
            END IF;
            busy := 'broadcast rows';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            ids := ARRAY(SELECT b.id FROM broadcasts b
                         WHERE b.account = p_account
                           AND ((strpos(lower(b.audit_log::text), addr) > 0
                                 AND (b.audit_log @> '[{"action": "test"}]' OR is_address))
                                OR (is_address
                                    AND (strpos(lower(b.segment_filter::text), addr) > 0
                                         OR strpos(lower(b.filter_used::text), addr) > 0)))
                         ORDER BY b.id FOR UPDATE);
            busy := 'segment rows';
            PERFORM set_config('lock_timeout', greatest(1, ceil(extract(epoch FROM
                holding_until - clock_timestamp()) * 1000))::text || 'ms', true);
            PERFORM 1 FROM segments s
            WHERE s.account = p_account
              AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter
            ORDER BY s.name FOR UPDATE;
            busy := 'rewrite';
            PERFORM set_config('lock_timeout', caller_timeout, true);
            -- held: v3's three locks (v3 takes them again without waiting) and the rows
            -- rewritten below; a deadlock from here on rolls it all back and starts again
            SELECT * INTO v FROM pgcast_erase_v6(p_account, p_email, p_source, p_actor);
            entry := pgcast_audit_v1('erase', NULL, NULL, coalesce(p_actor, '{}'::jsonb)
                                     || jsonb_build_object('source', p_source));
            -- saved segments
            UPDATE segments s
            SET filter = pgcast_segment_scrub_v1(s.filter, addr),
                audit_log = s.audit_log
                    || jsonb_set(entry, '{0,details,scrubbed}', '["filter"]')
            WHERE s.account = p_account
              AND pgcast_segment_scrub_v1(s.filter, addr) IS DISTINCT FROM s.filter;
            GET DIAGNOSTICS seg = ROW_COUNT;
            -- broadcasts: the filter of a draft or a scheduled one, the filter a send
            -- evaluated and its copy in the audit entries
            WITH scrubbed AS (
                SELECT b.id,
                       pgcast_segment_scrub_v1(b.segment_filter, addr) AS segment_filter,
                       pgcast_segment_scrub_v1(b.filter_used, addr) AS filter_used,
                       (SELECT jsonb_agg(
                                   CASE WHEN jsonb_typeof(a.e -> 'details' -> 'filter') = 'object'
                                        THEN jsonb_set(a.e, '{details,filter}',
                                                       pgcast_segment_scrub_v1(
                                                           a.e -> 'details' -> 'filter', addr))
                                        ELSE a.e END ORDER BY a.i)
                        FROM jsonb_array_elements(b.audit_log) WITH ORDINALITY AS a(e, i))
                           AS audit_log
                FROM broadcasts b WHERE b.id = ANY (ids)
            ), changed AS (
                SELECT s.*, array_remove(ARRAY[
                           CASE WHEN s.segment_filter IS DISTINCT FROM b.segment_filter
                                THEN 'segment_filter' END,
                           CASE WHEN s.filter_used IS DISTINCT FROM b.filter_used
                                THEN 'filter_used' END,
                           CASE WHEN s.audit_log IS DISTINCT FROM b.audit_log
                                THEN 'audit_log' END], NULL) AS what
                FROM scrubbed s JOIN broadcasts b ON b.id = s.id
            )
            UPDATE broadcasts b
            SET segment_filter = c.segment_filter, filter_used = c.filter_used,
                audit_log = coalesce(c.audit_log, '[]'::jsonb)
                    || jsonb_set(jsonb_set(jsonb_set(entry, '{0,from}', to_jsonb(b.status)),
                                           '{0,to}', to_jsonb(b.status)),
                                 '{0,details,scrubbed}', to_jsonb(c.what))
            FROM changed c
            WHERE b.id = c.id AND cardinality(c.what) > 0;
            busy := NULL;
        EXCEPTION WHEN lock_not_available OR deadlock_detected THEN
            -- a short wait ran out (or Postgres chose this erase in a deadlock of its
            -- rewrite): everything taken and done in the block is rolled back
            IF busy = 'erasure lock' OR (busy = 'rewrite' AND SQLSTATE = '55P03') THEN
                RAISE;
            END IF;
        END;
        EXIT WHEN busy IS NULL;
    END LOOP;
    RETURN QUERY SELECT v.contact_id, v.recipients, v.messages, seg;
END
$$;
