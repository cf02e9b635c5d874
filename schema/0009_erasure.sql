-- 0009_erasure: the right to erasure (`pgcast contacts erase`, POST /contacts/erase).
-- * contact_erasures: a SHA-256 of each erased address (lower-cased), per account: the one
--   thing kept, so that a later import or POST /contacts of that address is refused.
-- * pgcast_erase_v1: deletes the contact, replaces the address of its recipient rows by
--   erased-<id>@erased.invalid and clears their last error, and records an 'erase' event,
--   in one transaction, durable whatever the server's synchronous_commit (an erasure
--   answered and then lost would bring the data back). Counters and recipient rows stay
--   as they were; a handoff skips a row whose contact is gone (0005).

CREATE TABLE contact_erasures (
    account    text        NOT NULL,
    email_hash bytea       NOT NULL,
    erased_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, email_hash)
);

-- erase: remove one address of an account from contacts and recipient rows; keep its hash.
-- Lock order (0005's): the contacts fence (the advisory lock a handoff takes shared before it
-- reads contacts), then the contact's recipient rows (one per broadcast), then the contact
-- row. A handoff that meets a deleted contact skips its row ('contact erased').
CREATE FUNCTION pgcast_erase_v1(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    cid bigint;
    n bigint := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    INSERT INTO contact_erasures (account, email_hash)
    VALUES (p_account, sha256(convert_to(lower(btrim(p_email)), 'UTF8')))
    ON CONFLICT DO NOTHING;
    -- lock order (docs/design.md): the contact row, then the contacts fence, then the rows
    SELECT c.id INTO cid FROM contacts c
    WHERE c.account = p_account AND lower(c.email) = lower(btrim(p_email)) FOR UPDATE;
    IF cid IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(p_account));
    UPDATE broadcast_recipients r
    SET email = 'erased-' || cid || '@erased.invalid', last_error = NULL
    WHERE r.contact_id = cid
      AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = r.broadcast_id
                  AND b.account = p_account);
    GET DIAGNOSTICS n = ROW_COUNT;
    DELETE FROM contacts c WHERE c.id = cid;
    INSERT INTO contact_events (account, contact_id, action, source, actor)
    VALUES (p_account, cid, 'erase', p_source, coalesce(p_actor, '{}'::jsonb));
    RETURN QUERY SELECT cid, n;
END
$$;
