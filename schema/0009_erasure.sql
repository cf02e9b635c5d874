-- 0009_erasure: the right to erasure (`pgcast contacts erase`, POST /contacts/erase).
-- * contact_erasures: a SHA-256 of each erased address (lower-cased), per account: the one
--   thing kept, so that a later import or POST /contacts of that address is refused.
-- * contacts.erased_at: an erased contact keeps its row (recipient rows and events point at
--   its id, and the handoff reads it) with every personal field scrubbed, the address
--   replaced by erased-<id>@erased.invalid, and unsubscribed: it is never mailed again.
-- * pgcast_erase_v1: the erasure in one transaction, durable whatever the server's
--   synchronous_commit (an erasure answered and then lost would bring the data back).

CREATE TABLE contact_erasures (
    account    text        NOT NULL,
    email_hash bytea       NOT NULL,
    erased_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account, email_hash)
);

ALTER TABLE contacts ADD COLUMN erased_at timestamptz;

-- erase: scrub one address of an account from contacts and recipient rows; keep its hash.
-- Lock order: the contact's recipient rows first (one per broadcast, as a handoff locks
-- them), then the contact row (as the handoff's fence reads it): never the other way round.
CREATE FUNCTION pgcast_erase_v1(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint)
LANGUAGE plpgsql
AS $$
DECLARE
    cid bigint;
    placeholder text;
    n bigint := 0;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    INSERT INTO contact_erasures (account, email_hash)
    VALUES (p_account, sha256(convert_to(lower(btrim(p_email)), 'UTF8')))
    ON CONFLICT DO NOTHING;
    SELECT c.id INTO cid FROM contacts c
    WHERE c.account = p_account AND lower(c.email) = lower(btrim(p_email));
    IF cid IS NULL THEN
        RETURN QUERY SELECT NULL::bigint, 0::bigint;
        RETURN;
    END IF;
    placeholder := 'erased-' || cid || '@erased.invalid';
    UPDATE broadcast_recipients r
    SET email = placeholder, last_error = NULL
    WHERE r.contact_id = cid
      AND EXISTS (SELECT 1 FROM broadcasts b WHERE b.id = r.broadcast_id
                  AND b.account = p_account);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE contacts c
    SET email = placeholder, name = '', tags = '{}', attributes = '{}',
        suppressed_detail = NULL,
        unsubscribed_at = coalesce(c.unsubscribed_at, clock_timestamp()),
        erased_at = clock_timestamp(), updated_at = now()
    WHERE c.id = cid;
    INSERT INTO contact_events (account, contact_id, action, source, actor)
    VALUES (p_account, cid, 'erase', p_source, coalesce(p_actor, '{}'::jsonb));
    RETURN QUERY SELECT cid, n;
END
$$;
