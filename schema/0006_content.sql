-- 0006_content: the key one-click unsubscribe tokens are made with when
-- PGCAST_UNSUBSCRIBE_SECRET is not set (the file and null providers): generated once, here,
-- so that the API and every worker agree on it. Two v4 UUIDs from Postgres's strong random
-- source: 244 random bits, as 64 hex characters.
CREATE TABLE unsubscribe_keys (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    secret     text        NOT NULL
        DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO unsubscribe_keys DEFAULT VALUES;

-- Test sends: the rendered message of a broadcast sent to a few chosen addresses, delivered
-- by a running worker (procrastinate task pgcast.test_send), not counted in progress.
CREATE TABLE test_sends (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account       text        NOT NULL,
    broadcast_id  uuid        NOT NULL REFERENCES broadcasts (id) ON DELETE CASCADE,
    to_address    text        NOT NULL,
    contact_email text,
    status        text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'sending', 'sent', 'failed')),
    message_id    text,
    error         text,
    requested_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz
);
CREATE INDEX test_sends_account ON test_sends (account, requested_at);

-- Queue test sends to p_to (each an address) unless the account would pass p_cap in the
-- last hour; appends a 'test' entry to the broadcast's audit log. ok=false with found=false:
-- no such broadcast; with found=true: over the cap (ids empty, nothing changed).
CREATE FUNCTION pgcast_test_send_v1(p_account text, p_id uuid, p_to text[], p_contact text,
                                    p_cap integer)
RETURNS TABLE (ok boolean, found boolean, recent integer, ids bigint[])
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n integer;
    made bigint[];
BEGIN
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, 0, '{}'::bigint[];
        RETURN;
    END IF;
    -- one account's requests count one at a time, so two at once cannot both pass the cap
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.test_send'), hashtext(p_account));
    SELECT count(*) INTO n FROM test_sends t
    WHERE t.account = p_account AND t.requested_at > clock_timestamp() - interval '1 hour';
    IF n + cardinality(p_to) > p_cap THEN
        RETURN QUERY SELECT false, true, n, '{}'::bigint[];
        RETURN;
    END IF;
    WITH ins AS (
        INSERT INTO test_sends (account, broadcast_id, to_address, contact_email)
        SELECT p_account, p_id, a, p_contact FROM unnest(p_to) AS a
        RETURNING test_sends.id
    )
    SELECT array_agg(ins.id ORDER BY ins.id) INTO made FROM ins;
    UPDATE broadcasts b
    SET audit_log = b.audit_log || pgcast_audit_v1('test', st, st, jsonb_build_object(
        'to', to_jsonb(p_to), 'contact', p_contact, 'test_sends', to_jsonb(made)))
    WHERE b.id = p_id;
    RETURN QUERY SELECT true, true, n, made;
END
$$;
