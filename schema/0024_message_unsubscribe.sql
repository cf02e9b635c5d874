-- 0024_message_unsubscribe (issue 26): a marketing message carries one-click unsubscribe
-- (RFC 8058) as a broadcast does. Its token names the message (mail.unsubscribe, kind 2); the
-- POST unsubscribes, account-wide, the contact of the message's account with the message's
-- address, and records it in contact_events (source 'message-one-click', the message's id in
-- details). An address that is no contact of the account becomes one, unsubscribed (and not
-- confirmed: it never opted in), so that later marketing messages and broadcasts skip it.

-- One-click unsubscribe from a marketing message: the contact's id and whether this call
-- changed anything (no row: no marketing message with that id, or its address was erased).
-- Locks, in the order every path takes them: the erasure lock (shared, as every writer that
-- could bring an address back: an erase that committed first leaves the placeholder address,
-- read after the lock, or the keyed hash), the contact row (or the row inserted), then the
-- contacts fence (exclusive: the fence trigger for an update; taken here for an insert, so
-- that a marketing handoff that reads the contacts after this commits sees the new row).
CREATE FUNCTION pgcast_unsubscribe_message_v1(p_message uuid)
RETURNS TABLE (contact_id bigint, changed boolean)
LANGUAGE plpgsql AS $$
DECLARE
    acct text;
    addr text;
    cid bigint;
    was timestamptz;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT m.account INTO acct FROM messages m
    WHERE m.id = p_message AND m.category = 'marketing';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(acct));
    -- after the lock: an erase that committed meanwhile has rewritten the address
    SELECT m.to_address INTO addr FROM messages m WHERE m.id = p_message;
    IF addr = 'erased@erased.invalid' OR pgcast_erased_v1(acct, addr) THEN
        RETURN;
    END IF;
    LOOP
        SELECT c.id, c.unsubscribed_at INTO cid, was FROM contacts c
        WHERE c.account = acct AND lower(c.email) = lower(addr)
        FOR UPDATE;
        IF FOUND THEN
            IF was IS NOT NULL THEN  -- the first time is kept
                RETURN QUERY SELECT cid, false;
                RETURN;
            END IF;
            UPDATE contacts c SET unsubscribed_at = clock_timestamp(), updated_at = now()
            WHERE c.id = cid;
            EXIT;
        END IF;
        INSERT INTO contacts (account, email, unsubscribed_at, confirmed_at)
        VALUES (acct, addr, clock_timestamp(), NULL)
        ON CONFLICT DO NOTHING
        RETURNING id INTO cid;
        IF cid IS NOT NULL THEN
            PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'), hashtext(acct));
            EXIT;
        END IF;
        -- inserted by someone else meanwhile (an import): lock theirs
    END LOOP;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (acct, cid, 'unsubscribe', 'message-one-click', '{"via": "one-click"}',
            jsonb_build_object('message_id', p_message));
    RETURN QUERY SELECT cid, true;
END
$$;

-- The share of a bucket's rate messages may take while broadcasts wait, v2: v1 refuses a share
-- that is not more than 0 and at most 1 (SQLSTATE 22023). A share of 0 held messages back for
-- as long as any broadcast waited for tokens (a password reset behind a whole broadcast):
-- messages come ahead of broadcasts, and a small share still gives them a steady part. A 0
-- already stored (set through v1 or by hand) keeps its meaning: messages take tokens only
-- when no broadcast is waiting.
CREATE FUNCTION pgcast_messages_share_v2(p_name text, p_share double precision)
RETURNS TABLE (name text, messages_share double precision)
LANGUAGE plpgsql AS $$
BEGIN
    IF p_share IS NULL OR NOT (p_share > 0 AND p_share <= 1) THEN
        RAISE EXCEPTION 'the messages share must be more than 0 and at most 1, not %', p_share
            USING ERRCODE = '22023',
                  HINT = '0 would hold messages back for as long as broadcasts wait';
    END IF;
    RETURN QUERY
    UPDATE rate_limits r SET messages_share = p_share, updated_at = now()
    WHERE r.name = p_name
    RETURNING r.name, r.messages_share;
END
$$;
