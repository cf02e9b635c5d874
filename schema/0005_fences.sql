-- 0005_fences: fences that hold under every interleaving (issue 11 §3), the mailable rule
-- with suppression, attributes for merge tags, and a broadcast that reached nobody ends
-- failed.
-- * Durable whatever the configuration: the handoff (both paths), cancel and pause pin
--   synchronous_commit on inside the function (set_config(..., true): a SET clause on a
--   function reverts before the commit), and so does every change of a contact's
--   unsubscribed_at or suppressed_at (a trigger), so an acknowledged unsubscribe survives a
--   crash even with synchronous_commit = off on the database or role.
-- * The pause fence everywhere: every claim and every handoff takes the shared advisory
--   lock (pgcast.handoff, broadcast) that pause takes exclusively, before it reads the
--   broadcast. A pause waits for claims and handoffs in progress, and sees their rows; a
--   handoff that waited for a pause reads `paused` and hands off nothing.
-- * The unsubscribe fence: every change of contacts.unsubscribed_at or suppressed_at, and
--   every delete of a contact, takes the advisory lock (pgcast.contacts, account)
--   exclusively (trigger pgcast_contact_fence); a handoff takes it shared before it reads
--   the contacts. No writer can commit between the handoff's read and its commit, so a
--   plain read is exact and no contact row is locked by the hot path.
-- * A handoff under an expired lease is refused (the rows stay claimed; the sweeper returns
--   them to pending): the sweeper may already count such rows.
-- * One lock order: advisory locks (handoff, then contacts), the broadcast row, recipient
--   rows in contact_id order taken in ONE pass (the sweep took claimed rows, then sending
--   rows, and deadlocked with renew; the handoff's skip branch had the same shape), then
--   nothing else. docs/design.md writes it down.
-- * The sweeper works one broadcast per transaction (pgcast_sweep_one_v1): it never holds
--   one broadcast while it waits for another.
-- * Rows waiting for their retry time are invisible to claims: the requeued index is keyed
--   by the time a row becomes due, and a claim reads only the due part.
-- * Mailable = not unsubscribed, not suppressed, not erased: read by the snapshot and by
--   both handoff paths the same way; the handoff returns the contact's attributes.
-- * The send refuses an empty segment unless asked (status 'empty', nothing changed), and
--   starts a draft or a scheduled broadcast; its audit entry carries the caller's details.
-- * Finalize: no row sent but some failed or unknown -> failed; everyone skipped -> sent,
--   with a message that says so.
-- Restart workers and the API after `pgcast migrate`: the functions they call are replaced.

-- The contacts fence -----------------------------------------------------------------------

-- a change that makes a contact unmailable (or mailable again) is durable and fenced
CREATE FUNCTION pgcast_contact_fence_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.contacts'),
                                  hashtext(CASE WHEN TG_OP = 'DELETE' THEN OLD.account
                                                ELSE NEW.account END));
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;
CREATE TRIGGER contacts_fence_update
    BEFORE UPDATE OF unsubscribed_at, suppressed_at ON contacts
    FOR EACH ROW
    WHEN (OLD.unsubscribed_at IS DISTINCT FROM NEW.unsubscribed_at
          OR OLD.suppressed_at IS DISTINCT FROM NEW.suppressed_at)
    EXECUTE FUNCTION pgcast_contact_fence_v1();
CREATE TRIGGER contacts_fence_delete
    BEFORE DELETE ON contacts
    FOR EACH ROW EXECUTE FUNCTION pgcast_contact_fence_v1();

-- Partitions: the requeued index keyed by due time -----------------------------------------

-- the partial indexes of one broadcast's partition, under the names the parent's indexes
-- adopt at ATTACH: empty on a new partition (a fresh row fails worker IS NOT NULL).
-- v2: the requeued index is keyed by when a row becomes due, so a claim reads due rows only.
CREATE FUNCTION pgcast_partition_indexes_v2(p_id uuid)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
    bare text := 'broadcast_recipients_' || replace(p_id::text, '-', '');
BEGIN
    EXECUTE format('CREATE INDEX %I ON %s'
                   ' ((coalesce(retry_at, ''-infinity''::timestamptz)), contact_id)'
                   ' WHERE worker IS NOT NULL AND status = ''pending''', bare || '_requeued', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, status, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''failed'', ''unknown'', ''skipped'')',
                   bare || '_problems', part);
    EXECUTE format('CREATE INDEX %I ON %s (broadcast_id, contact_id)'
                   ' WHERE worker IS NOT NULL AND status IN (''claimed'', ''sending'')',
                   bare || '_in_flight', part);
END
$$;

DROP INDEX broadcast_recipients_requeued;
DO $$
DECLARE
    bid uuid;
BEGIN
    FOR bid IN SELECT b.id FROM broadcasts b
               WHERE to_regclass(pgcast_partition_name_v1(b.id)) IS NOT NULL ORDER BY 1 LOOP
        EXECUTE format('CREATE INDEX %I ON %s'
                       ' ((coalesce(retry_at, ''-infinity''::timestamptz)), contact_id)'
                       ' WHERE worker IS NOT NULL AND status = ''pending''',
                       'broadcast_recipients_' || replace(bid::text, '-', '') || '_requeued',
                       pgcast_partition_name_v1(bid));
    END LOOP;
END
$$;
-- recipients back to pending after a claim, by the time they become due (NULL: now)
CREATE INDEX broadcast_recipients_requeued ON broadcast_recipients
    ((coalesce(retry_at, '-infinity'::timestamptz)), contact_id)
    WHERE worker IS NOT NULL AND status = 'pending';

-- a new, unattached partition for one broadcast (as v2, with pgcast_partition_indexes_v2)
CREATE FUNCTION pgcast_partition_create_v3(p_id uuid)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    part text := pgcast_partition_name_v1(p_id);
    bare text := 'broadcast_recipients_' || replace(p_id::text, '-', '');
BEGIN
    EXECUTE format(
        'CREATE TABLE %s (LIKE broadcast_recipients INCLUDING DEFAULTS INCLUDING CONSTRAINTS,'
        ' CONSTRAINT %I CHECK (broadcast_id = %L)) WITH ('
        -- No status change is HOT (status is in the partial indexes' predicates), so free
        -- space kept for updates only makes the snapshot write more pages: fillfactor 100.
        -- Each recipient leaves two or three dead versions: vacuum and analyze after 2% of
        -- the partition instead of the default 20%, at ten times the default cost limit.
        '  fillfactor = 100,'
        '  autovacuum_vacuum_scale_factor = 0.02,'
        '  autovacuum_vacuum_threshold = 10000,'
        '  autovacuum_vacuum_insert_scale_factor = 0.02,'
        '  autovacuum_analyze_scale_factor = 0.02,'
        '  autovacuum_analyze_threshold = 10000,'
        '  autovacuum_vacuum_cost_limit = 2000)',
        part, bare || '_broadcast', p_id);
    PERFORM pgcast_partition_indexes_v2(p_id);
    RETURN part;
END
$$;

-- Send -------------------------------------------------------------------------------------

-- send: draft|scheduled -> sending, with the snapshot of the mailable contacts of the
-- segment in the broadcast's own partition, in one transaction. Nobody to send to: refused
-- with status 'empty' and nothing changed, unless p_allow_empty (then 'sent' at once).
-- p_details joins the audit entry (who sent it, a schedule's lateness).
CREATE FUNCTION pgcast_send_v4(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
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

-- Claim ------------------------------------------------------------------------------------

-- the rows a claim takes, locked (SKIP LOCKED: a claim never waits): first recipients back
-- to pending after an earlier claim whose retry time has come, in the order they came due
-- (the requeued index, read only up to now: rows in backoff are never visited), then fresh
-- ones after the worker's cursor (the primary key, in contact_id order). last_fresh: the
-- highest fresh contact_id taken, the cursor when no fresh row was needed, NULL when fresh
-- rows were needed and none was free after the cursor. Index scans only (see v1).
CREATE FUNCTION pgcast_claim_rows_v2(p_id uuid, p_limit integer, p_after bigint,
                                     OUT ids bigint[], OUT last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    fresh bigint[];
BEGIN
    ids := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'pending'
          AND coalesce(l.retry_at, '-infinity'::timestamptz) <= now()
        ORDER BY coalesce(l.retry_at, '-infinity'::timestamptz), l.contact_id
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED);
    last_fresh := p_after;
    IF cardinality(ids) < p_limit THEN
        fresh := ARRAY(
            SELECT l.contact_id FROM broadcast_recipients l
            WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
              AND l.contact_id > p_after
            ORDER BY l.contact_id
            LIMIT p_limit - cardinality(ids)
            FOR UPDATE SKIP LOCKED);
        last_fresh := fresh[cardinality(fresh)];
        ids := ids || fresh;
    END IF;
END
$$;

-- claim: up to p_limit claimable rows -> claimed, with a lease. v3: takes the pause fence
-- shared (a pause waits for the claim, then sees its rows and puts them back).
CREATE FUNCTION pgcast_claim_v3(p_id uuid, p_limit integer, p_token uuid, p_worker text,
                                p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, attempts smallint, epoch integer,
               last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    c record;
BEGIN
    -- a claim lost to a server crash leaves its rows pending: its worker's handoff then
    -- fails the fence. Not worth an fsync.
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.handoff'), hashtext(p_id::text));
    SELECT b.epoch INTO e FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    c := pgcast_claim_rows_v2(p_id, p_limit, p_after);
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = 'claimed', claim_token = p_token, claim_epoch = e,
        worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, r.attempts, e, c.last_fresh;
END
$$;

-- Handoff ----------------------------------------------------------------------------------

-- handoff: the fence before the provider call. Moves this claim's rows to sending only
-- while the broadcast is still sending at the claim's epoch and the claim's lease holds;
-- rows whose contact is no longer mailable (unsubscribed, suppressed, erased) go to
-- skipped. Returns the rows to send now, with the contact's name and attributes as they
-- are at this moment (name, attributes, tags: what merge tags read). Synchronous whatever the configuration; committed by the caller
-- BEFORE the provider is called.
CREATE FUNCTION pgcast_handoff_v2(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
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
    -- the unsubscribe fence (exclusive in every writer of the columns read below), before
    -- the contacts are read: none of them can change until this transaction commits
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    gone := ARRAY(
        SELECT x.id FROM unnest(p_ids) AS x(id) LEFT JOIN contacts k ON k.id = x.id
        WHERE k.id IS NULL OR k.unsubscribed_at IS NOT NULL OR k.suppressed_at IS NOT NULL);
    IF cardinality(gone) > 0 THEN
        -- rare path: it changes a counter, so it takes the broadcast row before the rows
        -- (lock order) and checks the fence again under that lock
        PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending'
            AND b.epoch = p_epoch FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN;
        END IF;
    END IF;
    -- one pass, in contact_id order: this claim's rows whose lease still holds
    locked := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.contact_id = ANY (p_ids) AND l.status = 'claimed'
          AND l.claim_token = p_token AND l.lease_expires_at > clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    IF cardinality(gone) > 0 THEN
        UPDATE broadcast_recipients r
        SET status = 'skipped', lease_expires_at = NULL,
            last_error = coalesce((SELECT CASE WHEN k.unsubscribed_at IS NOT NULL
                                               THEN 'unsubscribed'
                                               ELSE 'suppressed: ' || k.suppressed_reason END
                                   FROM contacts k WHERE k.id = r.contact_id),
                                  'contact erased')
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
    RETURNING r.contact_id, r.email, c.name, c.attributes, c.tags;
END
$$;

-- claim and hand off in one statement, for a worker that will send the whole batch at
-- once. Synchronous, like every handoff. Recipients whose contact is no longer mailable
-- are only claimed (handed = false): the worker passes them to pgcast_handoff_v2, whose
-- rare path skips them under the broadcast row lock. Fences: the pause and unsubscribe
-- advisory locks, shared, as in pgcast_handoff_v2; a cancel meets it on the rows.
-- v3: synchronous commit pinned, the unsubscribe fence, suppressed and erased contacts,
-- the contact's attributes and tags (after name).
CREATE FUNCTION pgcast_claim_handoff_v3(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
RETURNS TABLE (contact_id bigint, email text, name text, attributes jsonb, tags text[],
               attempts smallint, epoch integer, handed boolean, last_fresh bigint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
    acct text;
    c record;
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
    RETURN QUERY
    UPDATE broadcast_recipients r
    SET status = CASE WHEN k.mailable THEN 'sending' ELSE 'claimed' END,
        handed_at = CASE WHEN k.mailable THEN statement_timestamp() END,
        claim_token = p_token, claim_epoch = e, worker = coalesce(p_worker, 'unnamed'),
        lease_expires_at = clock_timestamp() + p_lease
    FROM (SELECT x.id, coalesce(ct.name, '') AS name, coalesce(ct.attributes, '{}') AS attributes,
                 coalesce(ct.tags, '{}') AS tags, ct.id IS NOT NULL AND ct.unsubscribed_at IS NULL AND ct.suppressed_at IS NULL
                     AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e, k.mailable,
              c.last_fresh;
END
$$;

-- Cancel and pause: synchronous whatever the configuration ----------------------------------

-- cancel: draft|scheduled|sending|paused -> cancelled. Recipients not yet handed off end
-- cancelled. already_queued = recipients the provider had or has (sent, in flight,
-- unknown). v3: synchronous commit pinned; a scheduled broadcast can be cancelled.
CREATE FUNCTION pgcast_cancel_v3(p_account text, p_id uuid, p_details jsonb)
RETURNS TABLE (ok boolean, status text, already_queued integer)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    n integer;
    in_flight integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    UPDATE broadcasts AS u
    SET status = 'cancelled', finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('cancel', u.status, 'cancelled', p_details)
    WHERE u.id = p_id AND u.account = p_account
      AND u.status = ANY (ARRAY['draft', 'scheduled', 'sending', 'paused']);
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status, b.sent + b.unknown
            FROM broadcasts b WHERE b.id = p_id AND b.account = p_account;
        RETURN;
    END IF;
    UPDATE broadcast_recipients r
    SET status = 'cancelled', claim_token = NULL, lease_expires_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.status IN ('pending', 'claimed')
        ORDER BY l.contact_id FOR UPDATE));
    GET DIAGNOSTICS n = ROW_COUNT;
    SELECT count(*) INTO in_flight FROM broadcast_recipients r
    WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL AND r.status = 'sending';
    PERFORM pgcast_notify_v1('cancel', p_id, NULL);
    RETURN QUERY
    UPDATE broadcasts AS u SET cancelled = u.cancelled + n
    WHERE u.id = p_id
    RETURNING true, u.status, u.sent + u.unknown + in_flight;
END
$$;

-- pause: sending -> paused; claimed rows go back to pending. Takes the pause fence
-- exclusively (every claim and handoff takes it shared). v4: synchronous commit pinned.
CREATE FUNCTION pgcast_pause_v4(p_account text, p_id uuid, p_reason text, p_details jsonb)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    e integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.handoff'), hashtext(p_id::text));
    UPDATE broadcasts AS u
    SET status = 'paused', paused_reason = p_reason, updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('pause', u.status, 'paused',
            coalesce(p_details, '{}'::jsonb) || jsonb_build_object('reason', p_reason))
    WHERE u.id = p_id AND (p_account IS NULL OR u.account = p_account)
      AND u.status = ANY (ARRAY['sending'])
    RETURNING u.epoch INTO e;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, b.status FROM broadcasts b
            WHERE b.id = p_id AND (p_account IS NULL OR b.account = p_account);
        RETURN;
    END IF;
    UPDATE broadcast_recipients r
    SET status = 'pending', claim_token = NULL, lease_expires_at = NULL
    WHERE r.broadcast_id = p_id AND r.contact_id = ANY (ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL AND l.status = 'claimed'
        ORDER BY l.contact_id FOR UPDATE));
    PERFORM pgcast_notify_v1('pause', p_id, e);
    RETURN QUERY SELECT true, 'paused'::text;
END
$$;

-- Finalize and sweep ------------------------------------------------------------------------

-- finalize: sending -> sent|failed once nothing is pending, claimed or sending (see v3 for
-- the order of the checks). v4: a broadcast that reached nobody (no row sent, some failed
-- or unknown) ends failed; one whose recipients were all skipped ends sent, and its audit
-- entry says so.
CREATE FUNCTION pgcast_finalize_v4(p_id uuid)
RETURNS TABLE (ok boolean, status text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending';
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM broadcast_recipients r
               WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                 AND r.status IN ('claimed', 'sending'))
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status = 'pending') THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM broadcast_recipients r
               WHERE r.broadcast_id = p_id AND r.status = 'pending' AND r.worker IS NULL) THEN
        RETURN QUERY SELECT false, 'sending'::text;
        RETURN;
    END IF;
    PERFORM 1 FROM broadcasts b WHERE b.id = p_id AND b.status = 'sending' FOR NO KEY UPDATE;
    IF NOT FOUND
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status IN ('claimed', 'sending'))
       OR EXISTS (SELECT 1 FROM broadcast_recipients r
                  WHERE r.broadcast_id = p_id AND r.worker IS NOT NULL
                    AND r.status = 'pending') THEN
        RETURN;
    END IF;
    RETURN QUERY
    UPDATE broadcasts AS u
    SET status = CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0 THEN 'failed' ELSE 'sent' END,
        finished_at = now(), updated_at = now(),
        audit_log = u.audit_log || pgcast_audit_v1('finish', u.status,
            CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0 THEN 'failed' ELSE 'sent' END,
            jsonb_build_object('sent', u.sent, 'failed', u.failed, 'skipped', u.skipped,
                               'unknown', u.unknown)
            || CASE WHEN u.sent = 0 AND u.failed + u.unknown > 0
                    THEN jsonb_build_object('message', 'no recipient was sent')
                    WHEN u.sent = 0 AND u.skipped > 0
                    THEN jsonb_build_object('message', 'every recipient was skipped '
                         '(unsubscribed, suppressed or erased since the snapshot)')
                    ELSE '{}'::jsonb END)
    WHERE u.id = p_id AND u.status = ANY (ARRAY['sending'])
    RETURNING true, u.status;
END
$$;

-- sweep one broadcast, in its own transaction (the caller's): expired claims back to
-- pending, expired handoffs to unknown (never re-sent), finalized when its counters
-- account for every recipient. The broadcast row first, then its expired rows of both
-- kinds in ONE pass in contact_id order (renew's order: v3 took claimed rows, then
-- sending rows, and a renew holding a sending row below a claimed one made a cycle).
-- A cancelled broadcast is visited only while its counters say rows are still in flight.
CREATE FUNCTION pgcast_sweep_one_v1(p_id uuid)
RETURNS TABLE (broadcast_id uuid, reclaimed integer, unknown integer, finalized text)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    expired bigint[];
    n_re integer;
    n_unk integer;
    fin text;
    left_over integer;
BEGIN
    PERFORM 1 FROM broadcasts b
    WHERE b.id = p_id
      AND (b.status IN ('sending', 'paused')
           OR (b.status = 'cancelled'
               AND b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled > 0))
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    expired := ARRAY(
        SELECT l.contact_id FROM broadcast_recipients l
        WHERE l.broadcast_id = p_id AND l.worker IS NOT NULL
          AND l.status IN ('claimed', 'sending') AND l.lease_expires_at < clock_timestamp()
        ORDER BY l.contact_id FOR UPDATE);
    WITH upd AS (
        UPDATE broadcast_recipients r
        SET status = CASE WHEN r.status = 'claimed' THEN 'pending' ELSE 'unknown' END,
            claim_token = CASE WHEN r.status = 'claimed' THEN NULL ELSE r.claim_token END,
            lease_expires_at = CASE WHEN r.status = 'claimed' THEN NULL
                                    ELSE r.lease_expires_at END,
            last_error = CASE WHEN r.status = 'claimed' THEN r.last_error
                              ELSE 'worker lost during handoff: outcome unknown' END
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (expired)
        RETURNING r.status
    )
    SELECT count(*) FILTER (WHERE u.status = 'pending'),
           count(*) FILTER (WHERE u.status = 'unknown')
    INTO n_re, n_unk FROM upd u;
    IF n_unk > 0 THEN
        UPDATE broadcasts b SET unknown = b.unknown + n_unk WHERE b.id = p_id;
    END IF;
    SELECT b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled
    INTO left_over FROM broadcasts b WHERE b.id = p_id;
    fin := NULL;
    IF left_over <= 0 THEN
        SELECT f.status INTO fin FROM pgcast_finalize_v4(p_id) f WHERE f.ok;
    END IF;
    IF n_re > 0 OR n_unk > 0 OR fin IS NOT NULL THEN
        RETURN QUERY SELECT p_id, n_re, n_unk, fin;
    END IF;
END
$$;

-- Record ---------------------------------------------------------------------------------

-- record: one group's provider outcomes and the broadcast's counters, in one transaction.
-- The rows are locked first (contact_id order) and the outcomes reach them through a hash
-- join, linear in the group's size (v1 put the unnest() on the inner side of a nested loop).
-- v3: a retry, throttle or release that arrives after the broadcast finished (the sweeper
-- had counted the row unknown when its worker's lease ran out, and the broadcast was then
-- finalized) ends the row failed, counted: v2 put it back to pending in a finished broadcast,
-- where nothing would ever take it. Counters now follow the rows' new statuses.
-- v4: a late `sent` for a broadcast that finished failed (no row was known sent: 0005's
-- finalize) turns it sent, with an audit entry.
CREATE FUNCTION pgcast_record_v4(p_id uuid, p_token uuid, p_ids bigint[], p_outcomes text[],
                                 p_message_ids text[], p_errors text[], p_retry_in double precision[],
                                 p_breaker integer)
RETURNS TABLE (recorded integer, tripped boolean)
LANGUAGE plpgsql
SET enable_nestloop = off
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    locked bigint[];
    was_unknown integer;
    c record;
    streak integer;
    st text;
    is_cancelled boolean;
    is_finished boolean;
BEGIN
    -- Not worth an fsync, and it must not hold the broadcast row through one (every worker's
    -- record queues on that row): a record lost to a server crash leaves its rows sending,
    -- and the sweeper turns them unknown: never re-sent. The handoff stays synchronous.
    PERFORM set_config('synchronous_commit', 'off', true);
    -- lock order; a broadcast cancelled while this group was in the provider's hands gets
    -- its unsent rows as cancelled (a cancel only sees pending and claimed rows), and one
    -- that finished meanwhile gets them as failed
    SELECT b.status INTO st FROM broadcasts b WHERE b.id = p_id FOR NO KEY UPDATE;
    is_cancelled := st = 'cancelled';
    is_finished := st IN ('sent', 'failed');
    -- the rows this claim still holds; those the sweeper already counted unknown are
    -- corrected by their late outcome
    SELECT coalesce(array_agg(l.contact_id), '{}'), count(*) FILTER (WHERE l.status = 'unknown')
    INTO locked, was_unknown
    FROM (SELECT r.contact_id, r.status FROM broadcast_recipients r
          WHERE r.broadcast_id = p_id AND r.contact_id = ANY (p_ids) AND r.claim_token = p_token
            AND r.status IN ('sending', 'unknown')
          ORDER BY r.contact_id
          FOR UPDATE) l;
    WITH upd AS (
        UPDATE broadcast_recipients r
        SET status = CASE WHEN res.outcome IN ('sent', 'failed', 'unknown') THEN res.outcome
                          WHEN is_cancelled THEN 'cancelled'
                          WHEN is_finished THEN 'failed'
                          ELSE 'pending' END,
            attempts = r.attempts + CASE WHEN res.outcome IN ('sent', 'failed', 'retry', 'unknown')
                                         THEN 1 ELSE 0 END,
            provider_message_id = res.message_id,
            last_error = CASE WHEN is_finished AND res.outcome NOT IN ('sent', 'failed', 'unknown')
                              THEN 'broadcast finished before the ' || res.outcome
                                   || coalesce(': ' || res.error, '')
                              ELSE res.error END,
            sent_at = CASE WHEN res.outcome = 'sent' THEN now() END,
            retry_at = CASE WHEN res.outcome IN ('retry', 'throttled') AND st IN ('sending', 'paused')
                            THEN clock_timestamp() + make_interval(secs => res.retry_in)
                            ELSE r.retry_at END,
            claim_token = CASE WHEN res.outcome IN ('sent', 'failed', 'unknown')
                               THEN r.claim_token END,
            lease_expires_at = NULL
        FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
            AS res(contact_id, outcome, message_id, error, retry_in)
        WHERE r.broadcast_id = p_id AND r.contact_id = ANY (locked)
          AND r.contact_id = res.contact_id
        RETURNING res.outcome, r.status
    )
    SELECT count(*) AS n,
           count(*) FILTER (WHERE status = 'sent') AS n_sent,
           count(*) FILTER (WHERE status = 'failed') AS n_failed,
           count(*) FILTER (WHERE status = 'unknown') AS n_unknown,
           count(*) FILTER (WHERE outcome IN ('retry', 'failed')) AS n_bad,
           count(*) FILTER (WHERE status = 'cancelled') AS n_cancelled
    INTO c FROM upd;
    UPDATE broadcasts
    SET sent = sent + c.n_sent, failed = failed + c.n_failed,
        -- a late answer that says sent: the broadcast did reach somebody after all
        status = CASE WHEN status = 'failed' AND c.n_sent > 0 THEN 'sent' ELSE status END,
        audit_log = CASE WHEN status = 'failed' AND c.n_sent > 0
                         THEN audit_log || pgcast_audit_v1('late_sent', 'failed', 'sent',
                                                           jsonb_build_object('sent', c.n_sent))
                         ELSE audit_log END,
        unknown = unknown + c.n_unknown - was_unknown, cancelled = cancelled + c.n_cancelled,
        failure_streak = CASE WHEN c.n_sent > 0 THEN 0 ELSE failure_streak + c.n_bad END,
        updated_at = now()
    WHERE id = p_id
    RETURNING failure_streak INTO streak;
    RETURN QUERY SELECT c.n::integer, p_breaker > 0 AND streak > p_breaker;
END
$$;

-- The sweep ----------------------------------------------------------------------------

-- cancelled broadcasts whose counters say rows are still in flight: what a sweep visits
-- besides the active ones (a cancel turns pending and claimed rows into cancelled, so what
-- the counters do not account for is sending): tiny, so a sweep reads no finished broadcast.
-- Its predicate reads the counters, so a counter update is no longer a HOT update (one
-- index entry per index of broadcasts per record, i.e. per group of recipients, not per
-- recipient): the price of a sweep that stays O(active broadcasts) over years of history.
CREATE INDEX broadcasts_cancelled_in_flight ON broadcasts (id)
    WHERE status = 'cancelled'
      AND total - sent - failed - skipped - unknown - cancelled > 0;

-- Old versions: their fences are the defects above ---------------------------------------

DROP FUNCTION pgcast_record_v3(uuid, uuid, bigint[], text[], text[], text[], double precision[],
                               integer);
DROP FUNCTION pgcast_sweep_v3();
DROP FUNCTION pgcast_finalize_v3(uuid);
DROP FUNCTION pgcast_pause_v3(text, uuid, text, jsonb);
DROP FUNCTION pgcast_cancel_v2(text, uuid, jsonb);
DROP FUNCTION pgcast_claim_handoff_v2(uuid, integer, uuid, text, interval, bigint);
DROP FUNCTION pgcast_handoff_v1(uuid, integer, uuid, bigint[]);
DROP FUNCTION pgcast_claim_v2(uuid, integer, uuid, text, interval, bigint);
DROP FUNCTION pgcast_claim_rows_v1(uuid, integer, bigint);
DROP FUNCTION pgcast_send_v3(text, uuid);
DROP FUNCTION pgcast_partition_create_v2(uuid);
DROP FUNCTION pgcast_partition_indexes_v1(uuid);
