-- 0010: retention. A finished broadcast's recipients leave the live, partitioned
-- broadcast_recipients for a compact archive (`pgcast retention`): its partition is detached
-- (CONCURRENTLY, by the caller: that cannot run inside a function), copied here and dropped.
-- The broadcast row keeps its counters and audit log.

ALTER TABLE broadcasts ADD COLUMN archived_at timestamptz;

-- What a DBA asks of an old broadcast: was this address sent, when, with which provider
-- message id, and if not, why. Fixed-width columns first (no alignment padding), rows
-- appended in contact order and never updated (fillfactor 100). One index: the question
-- is asked by address.
CREATE TABLE broadcast_recipients_archive (
    broadcast_id        uuid        NOT NULL,
    contact_id          bigint      NOT NULL,
    sent_at             timestamptz,
    delivered_at        timestamptz,
    bounced_at          timestamptz,
    complained_at       timestamptz,
    status              text        NOT NULL,
    email               text        NOT NULL,
    provider_message_id text,
    last_error          text
) WITH (fillfactor = 100);
-- unique: a snapshot has one row per contact, and an account one contact per address
CREATE UNIQUE INDEX broadcast_recipients_archive_email
    ON broadcast_recipients_archive (broadcast_id, lower(email));

-- Every recipient, live or archived, for reading by hand (`archived` says which). To look
-- one address up quickly use the query `recipient_lookup` (sql/ops.sql): a live partition
-- is keyed by contact, not by address.
CREATE VIEW broadcast_recipients_all AS
SELECT r.broadcast_id, r.contact_id, r.email, r.status, r.sent_at, r.provider_message_id,
       r.last_error, r.delivered_at, r.bounced_at, r.complained_at, false AS archived
FROM broadcast_recipients r
UNION ALL
SELECT a.broadcast_id, a.contact_id, a.email, a.status, a.sent_at, a.provider_message_id,
       a.last_error, a.delivered_at, a.bounced_at, a.complained_at, true AS archived
FROM broadcast_recipients_archive a;

-- archive one broadcast whose partition the caller has detached: copy its rows, mark the
-- broadcast archived (audit: 'archive'), drop the partition, in one transaction. A broadcast
-- that is no longer finished (sent back to sending since the caller looked) gets its
-- partition attached again instead. Returns the rows archived; NULL when nothing was done.
CREATE FUNCTION pgcast_archive_v1(p_id uuid)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    part regclass := to_regclass(pgcast_partition_name_v1(p_id));
    st text;
    n integer;
BEGIN
    SELECT b.status INTO st FROM broadcasts b
    WHERE b.id = p_id AND b.archived_at IS NULL FOR UPDATE;
    IF NOT FOUND OR part IS NULL THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = part) THEN
        RAISE EXCEPTION 'partition % of broadcast % is still attached', part, p_id;
    END IF;
    IF st NOT IN ('sent', 'failed', 'cancelled') THEN
        EXECUTE format('ALTER TABLE broadcast_recipients ATTACH PARTITION %s FOR VALUES IN (%L)',
                       part, p_id);
        RETURN NULL;
    END IF;
    EXECUTE format(
        'INSERT INTO broadcast_recipients_archive (broadcast_id, contact_id, sent_at,'
        '  delivered_at, bounced_at, complained_at, status, email, provider_message_id,'
        '  last_error)'
        ' SELECT broadcast_id, contact_id, sent_at, delivered_at, bounced_at, complained_at,'
        '  status, email, provider_message_id, last_error FROM %s ORDER BY contact_id', part);
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE broadcasts b
    SET archived_at = now(), updated_at = now(),
        audit_log = b.audit_log || pgcast_audit_v1('archive', b.status, b.status,
                                                   jsonb_build_object('recipients', n))
    WHERE b.id = p_id;
    EXECUTE format('DROP TABLE %s', part);
    RETURN n;
END
$$;

-- erase, v2: the person's address leaves the archive too (v1 predates it): their archived
-- recipient rows get the same placeholder address as the live ones.
CREATE FUNCTION pgcast_erase_v2(p_account text, p_email text, p_source text, p_actor jsonb)
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
    -- and the archive (0010): found by address, one index probe per archived broadcast of
    -- the account (the archive is keyed by broadcast and address, not by contact)
    UPDATE broadcast_recipients_archive a
    SET email = 'erased-' || cid || '@erased.invalid', last_error = NULL
    WHERE a.broadcast_id IN (SELECT b.id FROM broadcasts b
                             WHERE b.account = p_account AND b.archived_at IS NOT NULL)
      AND lower(a.email) = lower(btrim(p_email)) AND a.contact_id = cid;
    DELETE FROM contacts c WHERE c.id = cid;
    INSERT INTO contact_events (account, contact_id, action, source, actor)
    VALUES (p_account, cid, 'erase', p_source, coalesce(p_actor, '{}'::jsonb));
    RETURN QUERY SELECT cid, n;
END
$$;
DROP FUNCTION pgcast_erase_v1(text, text, text, jsonb);
