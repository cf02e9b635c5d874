-- 0030_claim_columns (issue 32, the worker's CPU per recipient): claim only the columns the
-- content reads.
--
-- claim and hand off, v6, and hand off, v4: v5's and v3's fences, rows and order unchanged,
-- with one more argument, p_contact: false returns the contact's attributes and tags as NULL
-- (a content whose templates never read `contact`: measured, psycopg decoding each row's
-- jsonb attributes and text[] tags was about a fifth of a null-provider worker's samples).
-- The name and the address are returned either way (the To header).

CREATE FUNCTION pgcast_handoff_v4(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[],
                                  p_contact boolean)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[])
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    gone bigint[];
    locked bigint[];
    n_skip integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    -- the pause fence (exclusive in pause), before the broadcast is read
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.account INTO acct FROM broadcasts b
    WHERE b.id = p_id AND b.status = 'sending' AND b.epoch = p_epoch;
    IF NOT FOUND THEN
        RETURN;  -- fenced: cancelled, paused or resumed since the claim
    END IF;
    -- the contacts fence (exclusive in every writer of the columns the predicate reads)
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    gone := ARRAY(
        SELECT x.id FROM unnest(p_ids) AS x(id) LEFT JOIN contacts k ON k.id = x.id
        WHERE k.id IS NULL OR NOT pgcast_mailable(k));
    IF cardinality(gone) > 0 THEN
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    locked := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND l.lease_expires_at > clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(gone) > 0 THEN
        UPDATE broadcast_recipients r
        SET status = 'skipped', lease_expires_at = NULL,
            last_error = coalesce((SELECT pgcast_unmailable_reason_v1(k) FROM contacts k
                                   WHERE k.id = r.contact_id), 'contact erased')
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (locked)
          AND r.contact_id = ANY (gone);
        GET DIAGNOSTICS n_skip = ROW_COUNT;
        UPDATE broadcasts SET skipped = skipped + n_skip WHERE id = p_id;
    END IF;
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'sending', handed_at = statement_timestamp()
    FROM contacts c
    WHERE r.broadcast_id = p_id AND c.id = r.contact_id AND r.contact_id = ANY (locked)
      AND NOT (r.contact_id = ANY (gone))
    RETURNING r.contact_id, r.email, c.name, CASE WHEN p_contact THEN c.attributes END,
              CASE WHEN p_contact THEN c.tags END;
END
$$;

CREATE FUNCTION pgcast_claim_handoff_v6(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint,
                                        p_contact boolean)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint,
               global_rate double precision)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
    lim double precision;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.epoch, b.account INTO e, acct FROM broadcasts b
    WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    c := pgcast_claim_rows_v2(p_id, p_limit, p_after);
    lim := coalesce((SELECT l.rate FROM rate_limits l WHERE l.name = 'global'), 0);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable AND lim = 0 THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable AND lim = 0 THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name,
                 CASE WHEN p_contact THEN coalesce(ct.attributes, '{}') END AS attributes,
                 CASE WHEN p_contact THEN coalesce(ct.tags, '{}') END AS tags,
                 ct.id IS NOT NULL AND pgcast_mailable(ct) AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e,
              k.mailable AND lim = 0, c.last_fresh, lim;
END
$$;
