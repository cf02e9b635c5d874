-- 0015_senders (issue 23): one limit on account names, and the senders an account may use.
-- * Account names are 1-200 characters everywhere: the JWT claim, the CLI's ACCOUNT and a
--   CHECK on every table an account name enters by (contacts, broadcasts, erasures,
--   rate weights, senders). Rows already over the limit stop the migration with their
--   count: rename them first (nothing is cut silently).
-- * senders: the From addresses and domains an operator allows an account (`pgcast senders
--   add`). An account with none may use any From, as before; with some, a broadcast's From
--   must be one of them (an address) or at one of them (a domain) to be sent, scheduled or
--   test-sent.

DO $$
DECLARE
    n bigint;
BEGIN
    SELECT (SELECT count(*) FROM contacts WHERE char_length(account) NOT BETWEEN 1 AND 200)
         + (SELECT count(*) FROM broadcasts WHERE char_length(account) NOT BETWEEN 1 AND 200)
         + (SELECT count(*) FROM contact_erasures
            WHERE char_length(account) NOT BETWEEN 1 AND 200)
         + (SELECT count(*) FROM rate_weights WHERE char_length(account) NOT BETWEEN 1 AND 200)
      INTO n;
    IF n > 0 THEN
        RAISE EXCEPTION 'pgcast 0015: % rows (contacts, broadcasts, erasures, weights) have '
                        'an account name that is empty or longer than 200 characters; '
                        'rename those accounts first', n;
    END IF;
END
$$;

ALTER TABLE contacts ADD CONSTRAINT contacts_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE broadcasts ADD CONSTRAINT broadcasts_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE contact_erasures ADD CONSTRAINT contact_erasures_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);
ALTER TABLE rate_weights ADD CONSTRAINT rate_weights_account_length
    CHECK (char_length(account) BETWEEN 1 AND 200);

-- sender: a lower-case address (has an @) or a lower-case domain, IDNA (punycode) form
CREATE TABLE senders (
    account    text        NOT NULL,
    sender     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, sender),
    CONSTRAINT senders_account_length CHECK (char_length(account) BETWEEN 1 AND 200),
    CONSTRAINT senders_sender_check
        CHECK (sender = lower(sender) AND char_length(sender) BETWEEN 1 AND 254)
);

-- Queue test sends (0001's v1, plus): the erasure lock (shared) first, then the broadcast's
-- row, and inside them the refusals: an address of p_to that is erased (its keyed hash),
-- suppressed or unsubscribed in the account, or a p_contact that is erased, is refused with
-- nothing queued (refused: [{field, address, reason}]). So an erase cannot commit between the
-- check and the queue (the address mailed, or written back into test_sends and the audit log).
CREATE FUNCTION pgcast_test_send_v2(p_account text, p_id uuid, p_to text[], p_contact text,
                                    p_cap integer)
RETURNS TABLE (ok boolean, found boolean, recent integer, ids bigint[], refused jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    st text;
    n integer;
    made bigint[];
    bad jsonb;
BEGIN
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, false, 0, '{}'::bigint[], '[]'::jsonb;
        RETURN;
    END IF;
    SELECT coalesce(jsonb_agg(jsonb_build_object('field', r.field, 'address', r.address,
                                                 'reason', r.reason) ORDER BY r.n), '[]')
    INTO bad
    FROM (
        SELECT a.n, 'to' AS field, a.address,
               CASE WHEN pgcast_erased_v1(p_account, a.address) THEN 'erased'
                    WHEN c.suppressed_at IS NOT NULL
                         THEN 'suppressed (' || c.suppressed_reason || ')'
                    WHEN c.unsubscribed_at IS NOT NULL THEN 'unsubscribed'
               END AS reason
        FROM unnest(p_to) WITH ORDINALITY AS a(address, n)
        LEFT JOIN contacts c ON c.account = p_account AND lower(c.email) = lower(a.address)
        UNION ALL
        SELECT 0, 'contact', p_contact, 'erased'
        WHERE p_contact IS NOT NULL
          AND pgcast_erased_v1(p_account, p_contact)
    ) r
    WHERE r.reason IS NOT NULL;
    IF bad <> '[]'::jsonb THEN
        RETURN QUERY SELECT false, true, 0, '{}'::bigint[], bad;
        RETURN;
    END IF;
    -- one account's requests count one at a time, so two at once cannot both pass the cap
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.test_send'), hashtext(p_account));
    SELECT count(*) INTO n FROM test_sends t
    WHERE t.account = p_account AND t.requested_at > clock_timestamp() - interval '1 hour';
    IF n + cardinality(p_to) > p_cap THEN
        RETURN QUERY SELECT false, true, n, '{}'::bigint[], '[]'::jsonb;
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
    RETURN QUERY SELECT true, true, n, made, '[]'::jsonb;
END
$$;
DROP FUNCTION pgcast_test_send_v1(text, uuid, text[], text, integer);
