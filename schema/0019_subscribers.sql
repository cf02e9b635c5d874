-- 0019_subscribers (issue 28): the subscriber's side. Sign-up forms with double opt-in (a
-- contact can be unconfirmed), public topics for a preference centre, and a public archive.
--
-- A contact is mailable when it is confirmed, not unsubscribed, not suppressed and not erased
-- (deleted). pgcast_mailable_v1 says so in ONE place: the snapshot (pgcast_send_v6), both
-- handoff paths (pgcast_handoff_v3, pgcast_claim_handoff_v5) and any later filter call it.
-- It is a LANGUAGE sql expression of the row, inlined by the planner: the snapshot's plan is
-- the same as with the columns spelled out.

-- NULL: signed up on a form and not confirmed yet. Existing contacts, imports and API adds
-- are confirmed (the default: the time they were written).
ALTER TABLE contacts ADD COLUMN confirmed_at timestamptz DEFAULT now();

CREATE FUNCTION pgcast_mailable_v1(c contacts)
RETURNS boolean LANGUAGE sql IMMUTABLE AS $$
    SELECT c.confirmed_at IS NOT NULL AND c.unsubscribed_at IS NULL AND c.suppressed_at IS NULL
$$;

-- why a contact is not mailable ('contact erased' when the row is gone), NULL when it is
CREATE FUNCTION pgcast_unmailable_reason_v1(c contacts)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN c.id IS NULL THEN 'contact erased'
                WHEN c.unsubscribed_at IS NOT NULL THEN 'unsubscribed'
                WHEN c.suppressed_at IS NOT NULL THEN 'suppressed: ' || c.suppressed_reason
                WHEN c.confirmed_at IS NULL THEN 'unconfirmed'
           END
$$;

-- the contacts fence covers the confirmation too: a confirm (or an unconfirm) commits before
-- or after a handoff, never in the middle of one
DROP TRIGGER contacts_fence_update ON contacts;
CREATE TRIGGER contacts_fence_update
    BEFORE UPDATE OF unsubscribed_at, suppressed_at, confirmed_at ON contacts
    FOR EACH ROW
    WHEN (OLD.unsubscribed_at IS DISTINCT FROM NEW.unsubscribed_at
          OR OLD.suppressed_at IS DISTINCT FROM NEW.suppressed_at
          OR OLD.confirmed_at IS DISTINCT FROM NEW.confirmed_at)
    EXECUTE FUNCTION pgcast_contact_fence_v1();

-- consent and preference changes are contact events too
ALTER TABLE contact_events DROP CONSTRAINT contact_events_action_check;
ALTER TABLE contact_events ADD CONSTRAINT contact_events_action_check
    CHECK (action IN ('unsubscribe', 'resubscribe', 'suppress', 'unsuppress', 'soft_bounce',
                      'erase', 'signup', 'confirm', 'preferences'));

-- A sign-up form: the tags a confirmed sign-up gets, the From of its confirmation mails,
-- whether it asks for confirmation, where
-- it sends the browser afterwards, and whether other sites may frame it.
CREATE TABLE forms (
    id            uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    account       text        NOT NULL CHECK (char_length(account) BETWEEN 1 AND 200),
    name          text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 200),
    tags          text[]      NOT NULL DEFAULT '{}',
    -- the From of the confirmation mails
    from_address  text        NOT NULL CHECK (char_length(from_address) BETWEEN 3 AND 998),
    double_opt_in boolean     NOT NULL DEFAULT true,
    redirect_url  text        CHECK (redirect_url ~ '^https?://' AND char_length(redirect_url) <= 2000),
    embeddable    boolean     NOT NULL DEFAULT false,
    created_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (account, name)
);

-- The tags of an account a person may choose on their preference page, with a label.
CREATE TABLE topics (
    account    text        NOT NULL CHECK (char_length(account) BETWEEN 1 AND 200),
    tag        text        NOT NULL CHECK (char_length(tag) BETWEEN 1 AND 100),
    label      text        NOT NULL CHECK (char_length(label) BETWEEN 1 AND 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account, tag)
);

-- An account's public archive page (/a/{slug}): the sent broadcasts created with archive.
CREATE TABLE archives (
    account    text        PRIMARY KEY CHECK (char_length(account) BETWEEN 1 AND 200),
    slug       text        NOT NULL UNIQUE CHECK (slug ~ '^[a-z0-9][a-z0-9-]{0,62}$'),
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE broadcasts ADD COLUMN archive boolean NOT NULL DEFAULT false;

-- A sign-up on a form, one transaction: the erasure lock (shared) first, then the contact row
-- (created unconfirmed, or the existing one locked). Outcomes:
--   mail       a confirmation is due (new, unconfirmed or unsubscribed contact); the signup
--              event (details.mailed) counts toward p_max_mails per 24 hours
--   limited    as mail, but p_max_mails confirmations went out in the last 24 hours
--   tagged     already mailable: the form's tags are added, nothing is sent
--   subscribed a form without double opt-in: a new or unconfirmed contact is confirmed
--   ignored    erased, suppressed, or unsubscribed on a form without double opt-in
--   no_form    the form does not exist
-- Every outcome answers the person the same page: a form never tells who is on the list.
CREATE FUNCTION pgcast_signup_v1(p_form uuid, p_email text, p_name text, p_max_mails integer,
                                 p_details jsonb)
RETURNS TABLE (outcome text, contact_id bigint, account text, event_id bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    f forms%ROWTYPE;
    c contacts%ROWTYPE;
    mailed integer;
    ev bigint;
    details jsonb;
BEGIN
    SELECT * INTO f FROM forms WHERE id = p_form;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'no_form'::text, NULL::bigint, NULL::text, NULL::bigint;
        RETURN;
    END IF;
    details := coalesce(p_details, '{}') || jsonb_build_object('form', f.id, 'form_name', f.name);
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(f.account));
    IF pgcast_erased_v1(f.account, p_email) THEN
        RETURN QUERY SELECT 'ignored'::text, NULL::bigint, f.account, NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO contacts AS k (account, email, name, tags, confirmed_at)
    VALUES (f.account, p_email, coalesce(p_name, ''),
            CASE WHEN f.double_opt_in THEN '{}' ELSE f.tags END,
            CASE WHEN f.double_opt_in THEN NULL ELSE clock_timestamp() END)
    ON CONFLICT (account, lower(email)) DO NOTHING
    RETURNING * INTO c;
    IF c.id IS NOT NULL AND NOT f.double_opt_in THEN
        INSERT INTO contact_events (account, contact_id, action, source, actor, details)
        VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                details || '{"confirmed": false, "double_opt_in": false}')
        RETURNING id INTO ev;
        RETURN QUERY SELECT 'subscribed'::text, c.id, f.account, ev;
        RETURN;
    END IF;
    IF c.id IS NULL THEN
        SELECT * INTO c FROM contacts k
        WHERE k.account = f.account AND lower(k.email) = lower(p_email) FOR UPDATE;
        IF NOT FOUND THEN  -- erased between the insert and the read: nothing to do
            RETURN QUERY SELECT 'ignored'::text, NULL::bigint, f.account, NULL::bigint;
            RETURN;
        END IF;
        IF c.suppressed_at IS NOT NULL
           OR (NOT f.double_opt_in AND c.unsubscribed_at IS NOT NULL) THEN
            RETURN QUERY SELECT 'ignored'::text, c.id, f.account, NULL::bigint;
            RETURN;
        END IF;
        IF pgcast_mailable_v1(c) THEN
            UPDATE contacts k SET tags = k.tags || ARRAY(
                    SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
                updated_at = now()
            WHERE k.id = c.id;
            INSERT INTO contact_events (account, contact_id, action, source, actor, details)
            VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                    details || '{"already_subscribed": true}')
            RETURNING id INTO ev;
            RETURN QUERY SELECT 'tagged'::text, c.id, f.account, ev;
            RETURN;
        END IF;
        IF NOT f.double_opt_in THEN  -- unconfirmed, signing up on a form without opt-in
            UPDATE contacts k SET confirmed_at = clock_timestamp(), tags = k.tags || ARRAY(
                    SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
                updated_at = now()
            WHERE k.id = c.id;
            INSERT INTO contact_events (account, contact_id, action, source, actor, details)
            VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
                    details || '{"confirmed": false, "double_opt_in": false}')
            RETURNING id INTO ev;
            RETURN QUERY SELECT 'subscribed'::text, c.id, f.account, ev;
            RETURN;
        END IF;
    END IF;
    -- double opt-in: a new, unconfirmed or unsubscribed contact gets a confirmation
    SELECT count(*) INTO mailed FROM contact_events e
    WHERE e.account = f.account AND e.contact_id = c.id AND e.action = 'signup'
      AND e.at > clock_timestamp() - interval '24 hours' AND e.details @> '{"mailed": true}';
    IF mailed >= p_max_mails THEN
        RETURN QUERY SELECT 'limited'::text, c.id, f.account, NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (f.account, c.id, 'signup', 'form', '{"via": "form"}',
            details || '{"mailed": true}')
    RETURNING id INTO ev;
    RETURN QUERY SELECT 'mail'::text, c.id, f.account, ev;
END
$$;

-- One POST /f/{id} in one statement: pgcast_signup_v1 and, when a confirmation is due,
-- pgcast_send_confirmation_v1 with the mail the caller composed (its link names the address
-- and the form, so it is made before the contact's id is known), from the form's From, keyed
-- by the signup event. With what the answer needs: the form's double_opt_in, redirect_url
-- and embeddable. No row when the form does not exist.
CREATE FUNCTION pgcast_form_signup_v1(p_form uuid, p_email text, p_name text,
                                      p_max_mails integer, p_details jsonb, p_subject text,
                                      p_text text, p_html text)
RETURNS TABLE (outcome text, message_id uuid, double_opt_in boolean, redirect_url text,
               embeddable boolean)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    f forms%ROWTYPE;
    mid uuid;
BEGIN
    -- held until commit: a form deleted meanwhile waits (its From is read once, here)
    SELECT * INTO f FROM forms WHERE id = p_form FOR KEY SHARE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT * INTO s FROM pgcast_signup_v1(p_form, p_email, p_name, p_max_mails, p_details);
    IF s.outcome = 'mail' THEN
        mid := pgcast_send_confirmation_v1(s.account, p_email, p_subject, p_text, p_html,
                                           f.from_address, 'confirmation:' || s.event_id);
    END IF;
    RETURN QUERY SELECT s.outcome, mid, f.double_opt_in, f.redirect_url, f.embeddable;
END
$$;

-- Confirm a sign-up (POST /f/confirm/{token}): the contact becomes confirmed and subscribed
-- with the form's tags, and contact_events records the consent (form, time, confirmed). An
-- unsubscribe later than the token (p_issued) is not undone by an old link. ok = false when
-- the contact or the form is gone, the contact is suppressed, or it unsubscribed since.
CREATE FUNCTION pgcast_confirm_v1(p_email text, p_form uuid, p_issued timestamptz,
                                  p_details jsonb)
RETURNS TABLE (ok boolean, account text, redirect_url text)
LANGUAGE plpgsql AS $$
DECLARE
    f forms%ROWTYPE;
    c contacts%ROWTYPE;
BEGIN
    SELECT * INTO f FROM forms WHERE id = p_form;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::text, NULL::text;
        RETURN;
    END IF;
    SELECT * INTO c FROM contacts k
    WHERE k.account = f.account AND lower(k.email) = lower(p_email) FOR UPDATE;
    IF NOT FOUND OR c.suppressed_at IS NOT NULL OR c.unsubscribed_at > p_issued THEN
        RETURN QUERY SELECT false, f.account, f.redirect_url;
        RETURN;
    END IF;
    IF pgcast_mailable_v1(c) AND c.tags @> f.tags THEN  -- confirmed already (a second click)
        RETURN QUERY SELECT true, f.account, f.redirect_url;
        RETURN;
    END IF;
    UPDATE contacts k
    SET confirmed_at = coalesce(k.confirmed_at, clock_timestamp()), unsubscribed_at = NULL,
        tags = k.tags || ARRAY(SELECT t FROM unnest(f.tags) t WHERE NOT t = ANY (k.tags)),
        updated_at = now()
    WHERE k.id = c.id;
    INSERT INTO contact_events (account, contact_id, action, source, actor, details)
    VALUES (f.account, c.id, 'confirm', 'form', '{"via": "form"}',
            coalesce(p_details, '{}') || jsonb_build_object(
                'form', f.id, 'form_name', f.name, 'confirmed', true, 'tags', f.tags,
                'resubscribed', c.unsubscribed_at IS NOT NULL, 'link_issued_at', p_issued));
    RETURN QUERY SELECT true, f.account, f.redirect_url;
END
$$;

-- Save a person's preference page: their tags among the account's topics become exactly
-- p_chosen (other tags are kept); one preferences event with what was added and removed.
CREATE FUNCTION pgcast_preferences_v1(p_contact bigint, p_chosen text[], p_broadcast uuid)
RETURNS TABLE (ok boolean, added text[], removed text[])
LANGUAGE plpgsql AS $$
DECLARE
    c contacts%ROWTYPE;
    offered text[];
    wanted text[];
    plus text[];
    minus text[];
BEGIN
    SELECT * INTO c FROM contacts k WHERE k.id = p_contact FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::text[], NULL::text[];
        RETURN;
    END IF;
    offered := ARRAY(SELECT t.tag FROM topics t WHERE t.account = c.account ORDER BY t.tag);
    wanted := ARRAY(SELECT x FROM unnest(p_chosen) x WHERE x = ANY (offered));
    plus := ARRAY(SELECT x FROM unnest(wanted) x WHERE NOT x = ANY (c.tags));
    minus := ARRAY(SELECT x FROM unnest(c.tags) x WHERE x = ANY (offered) AND NOT x = ANY (wanted));
    IF cardinality(plus) + cardinality(minus) > 0 THEN
        UPDATE contacts k
        SET tags = ARRAY(SELECT x FROM unnest(k.tags) x WHERE NOT x = ANY (minus)) || plus,
            updated_at = now()
        WHERE k.id = c.id;
        INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id,
                                    details)
        VALUES (c.account, c.id, 'preferences', 'preferences', '{"via": "preferences"}',
                p_broadcast, jsonb_build_object('added', plus, 'removed', minus));
    END IF;
    RETURN QUERY SELECT true, plus, minus;
END
$$;

-- send, v6: v5 with the snapshot through pgcast_mailable_v1 (unconfirmed contacts are in no
-- audience).
CREATE FUNCTION pgcast_send_v6(p_account text, p_id uuid, p_allow_empty boolean DEFAULT false,
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
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    SELECT * INTO b FROM broadcasts WHERE id = p_id AND account = p_account FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF b.status NOT IN ('draft', 'scheduled') THEN
        RETURN QUERY SELECT false, b.status, b.total;
        RETURN;
    END IF;
    part := pgcast_partition_create_v3(p_id);
    EXECUTE format(
        'INSERT INTO %s (broadcast_id, contact_id, email)'
        ' SELECT $1, c.id, c.email FROM contacts c'
        ' WHERE c.account = $2 AND pgcast_mailable_v1(c)'
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

-- handoff, v3: v2 with the contact read through pgcast_mailable_v1 (an unconfirmed contact
-- is skipped, 'unconfirmed') and the reason from pgcast_unmailable_reason_v1.
CREATE FUNCTION pgcast_handoff_v3(p_id uuid, p_epoch integer, p_token uuid, p_ids bigint[])
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
        WHERE k.id IS NULL OR NOT pgcast_mailable_v1(k));
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
    RETURNING r.contact_id, r.email, c.name, c.attributes, c.tags;
END
$$;

-- claim and hand off, v5: v4 with the contact read through pgcast_mailable_v1.
CREATE FUNCTION pgcast_claim_handoff_v5(p_id uuid, p_limit integer, p_token uuid,
                                        p_worker text, p_lease interval, p_after bigint)
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
                 coalesce(ct.attributes, '{}') AS attributes, coalesce(ct.tags, '{}') AS tags,
                 ct.id IS NOT NULL AND pgcast_mailable_v1(ct) AS mailable
          FROM unnest(c.ids) AS x(id) LEFT JOIN contacts ct ON ct.id = x.id) k
    WHERE r.broadcast_id = p_id AND k.id = r.contact_id AND r.contact_id = ANY (c.ids)
    RETURNING r.contact_id, r.email, k.name, k.attributes, k.tags, r.attempts, e,
              k.mailable AND lim = 0, c.last_fresh, lim;
END
$$;

-- start a due scheduled broadcast, v3: v2 through pgcast_send_v6 (the snapshot reads
-- pgcast_mailable_v1: an unconfirmed contact is in no scheduled broadcast either).
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
    -- the erasure lock before the broadcast row, as every path takes them: an erase holds
    -- the lock and may wait for this broadcast's row (its audit log can name the address in
    -- a test entry), so the row is never held while waiting for the lock. A due broadcast
    -- of an account an erase holds is left to the next sweep (never waited for).
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
        SELECT * INTO s FROM pgcast_send_v6(b.account, b.id, false, started);
        IF s.ok THEN
            RETURN QUERY SELECT b.id, s.status, s.queued, NULL::text, late;
            RETURN;
        END IF;
        -- 'empty': nobody mailable, and the send changed nothing
        why := 'empty_segment';
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

-- The confirmation of a sign-up, sent on the transactional messages path (0017: category
-- confirmation, ahead of broadcasts) in the caller's transaction. One function, so that the
-- path is named in one place; returns the message's id (the same id for the same key).
CREATE FUNCTION pgcast_send_confirmation_v1(p_account text, p_to text, p_subject text,
                                            p_text text, p_html text, p_from text,
                                            p_idempotency_key text)
RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
    RETURN pgcast_send_message(p_account, p_to, p_subject, p_text, p_html, p_from,
                               p_idempotency_key, 'confirmation');
END
$$;
