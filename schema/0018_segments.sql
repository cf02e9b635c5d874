-- 0018_segments (issue 27): send to exactly the contacts a filter describes, fixed at send.
-- * A filter is JSON ({"tag": ...}, {"attribute": ..., "eq": ...}, {"all": [...]}, ...,
--   docs/segments.md). pgcast_segment_sql_v1 is its one compiler and validator: it turns a
--   filter into a predicate over `contacts c` whose every value (attribute names included)
--   is read from one bound jsonb parameter ($1); the SQL text is built from fixed fragments
--   and array positions only. The send, `segment count`, the API and a DBA all use it.
-- * pgcast_mailable: the one definition of a contact that may be mailed, for the snapshot
--   and every segment (LANGUAGE sql, inlined by the planner).
-- * segments: saved filters per account; {"segment": NAME} refers to one (expanded when a
--   filter is compiled, so a send evaluates the definitions of its moment).
-- * broadcasts.segment_filter: a draft's audience as given (a filter, or {"segment": NAME});
--   broadcasts.filter_used: the filter the send evaluated, saved segments expanded, frozen.
-- * pgcast_send_v6 (v5 with the filter) and pgcast_start_due_v3 (through v6; a filter that
--   no longer compiles, a saved segment deleted since, ends the broadcast failed with the
--   reason invalid_segment).

-- The one definition of "mailable" (not unsubscribed, not suppressed; an erased contact is
-- deleted). Unversioned on purpose: a new contact state (double opt-in) extends it with
-- CREATE OR REPLACE in its own migration, and every snapshot and segment follows.
-- LANGUAGE sql and one expression: the planner inlines it into the caller's WHERE.
CREATE FUNCTION pgcast_mailable(c contacts) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL $$;

-- A stored attribute as a number for gt/gte/lt/lte: a JSON number, or a string written as a
-- plain decimal number (a CSV column is stored as a string); NULL otherwise.
CREATE FUNCTION pgcast_segment_number_v1(v jsonb) RETURNS numeric
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT CASE
        WHEN jsonb_typeof(v) = 'number' THEN (v #>> '{}')::numeric
        WHEN jsonb_typeof(v) = 'string' AND (v #>> '{}') ~ '^-?[0-9]{1,30}(\.[0-9]{1,30})?$'
            THEN (v #>> '{}')::numeric
    END
$$;

CREATE TABLE segments (
    account    text        NOT NULL,
    name       text        NOT NULL,
    filter     jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, name),
    CONSTRAINT segments_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT segments_name_check CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$')
);

ALTER TABLE broadcasts ADD COLUMN segment_filter jsonb;
ALTER TABLE broadcasts ADD COLUMN filter_used jsonb;
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_segment_one
    CHECK (segment_tag IS NULL OR segment_filter IS NULL);

-- Attribute conditions on eq/in (containment) and exists: GIN, so a selective condition is an
-- index scan; tags already have contacts_tags.
CREATE INDEX contacts_attributes ON contacts USING gin (attributes);

-- A filter error: the JSON path of what is wrong, then why (SQLSTATE PGS22, which the CLI
-- maps to exit 2 and the API to 422).
CREATE FUNCTION pgcast_segment_error_v1(p_path text, p_message text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PGS22', MESSAGE = p_path || ': ' || p_message;
END
$$;

-- One node of a filter: its predicate (over contacts c; values only as ($1->N)), the params
-- array grown with its values, the node count, and the node with saved segments expanded.
-- p_seen: the saved segments being expanded around this node (a cycle is refused).
-- Limits: depth 10 (saved segments count), 200 nodes, 100 items in a list, strings of 1000.
-- Adding an operator: one more WHEN below (and the docs' table).
CREATE FUNCTION pgcast_segment_node_v1(p_account text, p_filter jsonb, p_path text,
                                       p_depth integer, p_seen text[],
                                       INOUT params jsonb, INOUT nodes integer,
                                       OUT predicate text, OUT expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    k text;
    op text;
    v jsonb;
    name jsonb;
    n integer;
    i integer;
    sub record;
    parts text[] := '{}';
    items jsonb := '[]';
    ref text;
    keys text[];
    stored jsonb;
    ops constant text[] := ARRAY['eq', 'ne', 'in', 'exists', 'prefix', 'gt', 'gte', 'lt',
                                 'lte'];
BEGIN
    IF p_depth > 10 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too deep: at most 10 levels of nesting');
    END IF;
    nodes := nodes + 1;
    IF nodes > 200 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'too large: at most 200 conditions');
    END IF;
    IF jsonb_typeof(p_filter) IS DISTINCT FROM 'object' THEN
        PERFORM pgcast_segment_error_v1(p_path, 'a condition must be a JSON object');
    END IF;
    keys := ARRAY(SELECT jsonb_object_keys(p_filter) ORDER BY 1);
    IF p_filter ? 'attribute' THEN
        name := p_filter -> 'attribute';
        IF jsonb_typeof(name) IS DISTINCT FROM 'string'
                OR char_length(name #>> '{}') NOT BETWEEN 1 AND 64 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.attribute',
                                            'must be a name of 1 to 64 characters');
        END IF;
        SELECT array_agg(x) INTO keys FROM unnest(keys) x WHERE x <> 'attribute';
        IF coalesce(cardinality(keys), 0) <> 1 THEN
            PERFORM pgcast_segment_error_v1(p_path, 'an attribute condition has one operator ('
                                            || array_to_string(ops, ', ') || ')');
        END IF;
        op := keys[1];
        v := p_filter -> op;
        IF NOT op = ANY (ops) THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || op, 'unknown operator (one of '
                                            || array_to_string(ops, ', ') || ')');
        END IF;
        -- the name, as a bound value: ($1->>N) is the attribute's key
        params := params || jsonb_build_array(name);
        ref := format('($1->>%s)', jsonb_array_length(params) - 1);
        expanded := p_filter;
        CASE op
        WHEN 'eq', 'ne' THEN
            IF jsonb_typeof(v) IN ('object', 'array') THEN
                PERFORM pgcast_segment_error_v1(p_path || '.' || op,
                                                'must be a string, number, boolean or null');
            END IF;
            params := params || jsonb_build_array(jsonb_build_object(name #>> '{}', v));
            predicate := format('(c.attributes @> ($1->%s))', jsonb_array_length(params) - 1);
            IF op = 'ne' THEN
                predicate := '(NOT ' || predicate || ')';
            END IF;
        WHEN 'in' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'array' OR jsonb_array_length(v) NOT BETWEEN 1 AND 100
            THEN
                PERFORM pgcast_segment_error_v1(p_path || '.in',
                                                'must be a list of 1 to 100 values');
            END IF;
            FOR i IN 0 .. jsonb_array_length(v) - 1 LOOP
                IF jsonb_typeof(v -> i) IN ('object', 'array') THEN
                    PERFORM pgcast_segment_error_v1(format('%s.in[%s]', p_path, i),
                        'must be a string, number, boolean or null');
                END IF;
                params := params || jsonb_build_array(jsonb_build_object(name #>> '{}', v -> i));
                parts := parts || format('c.attributes @> ($1->%s)',
                                         jsonb_array_length(params) - 1);
            END LOOP;
            predicate := '(' || array_to_string(parts, ' OR ') || ')';
        WHEN 'exists' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'boolean' THEN
                PERFORM pgcast_segment_error_v1(p_path || '.exists', 'must be true or false');
            END IF;
            predicate := format('(c.attributes ? %s)', ref);
            IF v = 'false' THEN
                predicate := '(NOT ' || predicate || ')';
            END IF;
        WHEN 'prefix' THEN
            IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                    OR char_length(v #>> '{}') NOT BETWEEN 1 AND 1000 THEN
                PERFORM pgcast_segment_error_v1(p_path || '.prefix',
                                                'must be a string of 1 to 1000 characters');
            END IF;
            params := params || jsonb_build_array(v);
            predicate := format('coalesce(jsonb_typeof(c.attributes -> %s) = ''string'''
                                ' AND starts_with(c.attributes ->> %s, ($1->>%s)), false)',
                                ref, ref, jsonb_array_length(params) - 1);
        ELSE  -- gt, gte, lt, lte: numbers on both sides
            IF jsonb_typeof(v) IS DISTINCT FROM 'number' THEN
                PERFORM pgcast_segment_error_v1(p_path || '.' || op,
                    'must be a number (a numeric comparison needs numbers on both sides)');
            END IF;
            params := params || jsonb_build_array(v);
            predicate := format('coalesce(pgcast_segment_number_v1(c.attributes -> %s) %s'
                                ' ($1->>%s)::numeric, false)', ref,
                                CASE op WHEN 'gt' THEN '>' WHEN 'gte' THEN '>='
                                        WHEN 'lt' THEN '<' ELSE '<=' END,
                                jsonb_array_length(params) - 1);
        END CASE;
        RETURN;
    END IF;
    IF cardinality(keys) <> 1 THEN
        PERFORM pgcast_segment_error_v1(p_path, 'a condition has exactly one key (or '
                                        '"attribute" and one operator)');
    END IF;
    k := keys[1];
    v := p_filter -> k;
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
            SELECT * INTO sub FROM pgcast_segment_node_v1(
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
        SELECT * INTO sub FROM pgcast_segment_node_v1(
            p_account, v, p_path || '.not', p_depth + 1, p_seen, params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := '(NOT ' || sub.predicate || ')';
        expanded := jsonb_build_object('not', sub.expanded);
    WHEN 'tag' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                OR char_length(v #>> '{}') NOT BETWEEN 1 AND 100 THEN
            PERFORM pgcast_segment_error_v1(p_path || '.tag',
                                            'must be a tag of 1 to 100 characters');
        END IF;
        params := params || jsonb_build_array(v);
        predicate := format('(c.tags @> ARRAY[($1->>%s)])', jsonb_array_length(params) - 1);
    WHEN 'email_domain' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string'
                OR char_length(v #>> '{}') NOT BETWEEN 1 AND 253 OR (v #>> '{}') LIKE '%@%' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.email_domain',
                                            'must be a domain (1 to 253 characters, no @)');
        END IF;
        params := params || jsonb_build_array(v);
        predicate := format('(lower(split_part(c.email, ''@'', -1)) = lower($1->>%s))',
                            jsonb_array_length(params) - 1);
    WHEN 'created_after', 'created_before' THEN
        -- a date (midnight UTC) or a date and time with an offset; stored normalised
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~
                '^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?(Z|[+-][0-9]{2}:?[0-9]{2}))?$'
        THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                'must be a date (2024-01-31) or an ISO 8601 time with an offset');
        END IF;
        BEGIN
            stored := to_jsonb(CASE WHEN char_length(v #>> '{}') = 10
                                    THEN ((v #>> '{}') || 'T00:00:00+00:00')::timestamptz
                                    ELSE (v #>> '{}')::timestamptz END);
        EXCEPTION WHEN datetime_field_overflow OR invalid_datetime_format THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'not a valid date or time');
        END;
        params := params || jsonb_build_array(stored);
        -- an InitPlan: the text is cast once, not once per contact
        predicate := format('(c.created_at %s (SELECT ($1->>%s)::timestamptz))',
                            CASE k WHEN 'created_after' THEN '>' ELSE '<' END,
                            jsonb_array_length(params) - 1);
    WHEN 'received', 'delivered', 'bounced' THEN
        IF jsonb_typeof(v) IS DISTINCT FROM 'string' OR NOT (v #>> '{}') ~*
                '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'must be a broadcast id');
        END IF;
        PERFORM 1 FROM broadcasts b WHERE b.id = (v #>> '{}')::uuid AND b.account = p_account;
        IF NOT FOUND THEN
            PERFORM pgcast_segment_error_v1(p_path || '.' || k,
                                            'no broadcast ' || (v #>> '{}') || ' in this account');
        END IF;
        params := params || jsonb_build_array(v);
        -- a semi-join over the broadcast's rows, live or archived (contact_id is never NULL,
        -- so IN is true or false, never NULL)
        predicate := format('(c.id IN (SELECT r.contact_id FROM broadcast_recipients_all r'
                            ' WHERE r.broadcast_id = ($1->>%s)::uuid AND %s))',
                            jsonb_array_length(params) - 1,
                            CASE k WHEN 'received' THEN 'r.status = ''sent'''
                                   WHEN 'delivered' THEN 'r.delivered_at IS NOT NULL'
                                   ELSE 'r.bounced_at IS NOT NULL' END);
    WHEN 'opened', 'clicked' THEN
        PERFORM pgcast_segment_error_v1(p_path || '.' || k,
            'not available yet: pgcast does not track opens and clicks');
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
        SELECT * INTO sub FROM pgcast_segment_node_v1(
            p_account, stored, p_path || '.segment(' || (v #>> '{}') || ')', p_depth + 1,
            p_seen || (v #>> '{}'), params, nodes);
        params := sub.params;
        nodes := sub.nodes;
        predicate := sub.predicate;
        expanded := sub.expanded;
    ELSE
        PERFORM pgcast_segment_error_v1(p_path || '.' || k, 'unknown condition (one of all, '
            'any, not, tag, attribute, email_domain, created_after, created_before, received, '
            'delivered, bounced, segment)');
    END CASE;
END
$$;

-- A filter compiled: the predicate over `contacts c` (values only from the bound $1), the
-- jsonb array to bind as $1, and the filter with saved segments expanded (what a send
-- freezes). Raises PGS22 naming the JSON path of anything unknown or invalid. p_seen: the
-- saved segments that must not be referred to (a segment being saved: itself).
CREATE FUNCTION pgcast_segment_sql_v1(p_account text, p_filter jsonb,
                                      p_seen text[] DEFAULT '{}')
RETURNS TABLE (predicate text, params jsonb, expanded jsonb)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    r record;
BEGIN
    IF p_filter IS NULL OR octet_length(p_filter::text) > 16384 THEN
        PERFORM pgcast_segment_error_v1('$', 'a filter is a JSON object of at most 16 KiB');
    END IF;
    SELECT * INTO r FROM pgcast_segment_node_v1(p_account, p_filter, '$', 1, p_seen,
                                                '[]'::jsonb, 0);
    RETURN QUERY SELECT r.predicate, r.params, r.expanded;
END
$$;

-- The mailable contacts of an account a filter selects (for DBAs, and the tests).
CREATE FUNCTION pgcast_segment_contacts_v1(p_account text, p_filter jsonb)
RETURNS SETOF contacts
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, p_filter);
    RETURN QUERY EXECUTE 'SELECT c.* FROM contacts c WHERE c.account = $2'
                         ' AND pgcast_mailable(c) AND ' || s.predicate
        USING s.params, p_account;
END
$$;

-- How many mailable contacts of an account a filter selects (`segment count`).
CREATE FUNCTION pgcast_segment_count_v1(p_account text, p_filter jsonb)
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    s record;
    n bigint;
BEGIN
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, p_filter);
    EXECUTE 'SELECT count(*) FROM contacts c WHERE c.account = $2'
            ' AND pgcast_mailable(c) AND ' || s.predicate
        INTO n USING s.params, p_account;
    RETURN n;
END
$$;

-- The filter a broadcast sends to: its segment_filter, else its tag, else every contact.
CREATE FUNCTION pgcast_broadcast_filter_v1(b broadcasts) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
    SELECT coalesce(b.segment_filter,
                    CASE WHEN b.segment_tag IS NOT NULL
                         THEN jsonb_build_object('tag', b.segment_tag) END,
                    '{"all": []}'::jsonb)
$$;

-- send, v6: v5 with the broadcast's filter (pgcast_broadcast_filter_v1) compiled and
-- evaluated in the snapshot's statement, in the send's transaction; the filter evaluated
-- (saved segments expanded) is frozen in filter_used and in the audit entry. A filter that
-- does not compile (a saved segment deleted since) raises PGS22 and changes nothing.
CREATE FUNCTION pgcast_send_v6(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
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
    SELECT * INTO s FROM pgcast_segment_sql_v1(p_account, pgcast_broadcast_filter_v1(b));
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

-- start, v3: v2 through pgcast_send_v6. A filter that no longer compiles (a saved segment
-- deleted or changed since the broadcast was scheduled) ends the broadcast failed
-- (invalid_segment, the error in the audit entry) instead of failing every sweep.
CREATE FUNCTION pgcast_start_due_v3()
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
    -- a start that failed is as durable as one that sent (send_v6 pins the same)
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
            SELECT * INTO s FROM pgcast_send_v6(b.account, b.id, false, started);
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

DROP FUNCTION pgcast_start_due_v2();
DROP FUNCTION pgcast_send_v5(text, uuid, boolean, jsonb);
