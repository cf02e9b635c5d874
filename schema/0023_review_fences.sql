-- 0023_review_fences: defects found reviewing issues 26-30 together.
-- * The message fence read only unsubscribed_at for marketing mail: a marketing message went to
--   a contact who signed up on a form and never confirmed (0019). pgcast_message_handoff_v2
--   reads the contact through pgcast_unmailable_reason_v1 for marketing (unsubscribed,
--   suppressed, unconfirmed), as the broadcast handoffs do; every category is still skipped
--   for a suppressed or erased address.
-- * The erase (v4) kept the address where SES and applications put it: a message's error
--   text (SES quotes the recipient), its bounce or complaint diagnostic, and an idempotency
--   key built from the address (also copied into the message.* webhook events); and a
--   record or an SES event that arrived after the erase wrote an error text back.
--   pgcast_erase_v6 scrubs them, and a trigger keeps them scrubbed.
-- * A complaint about a message was only noted on the message: pgcast_message_feedback_v2
--   suppresses the contact too.
-- * The message handoff took several accounts' contacts fences by name, an untagged hard
--   bounce by lock key (hashtext): they deadlocked. v2 takes them by key.
-- * Record and renew locked one claim's rows in different orders and deadlocked: v2 of both
--   lock them in id order first (DESIGN: rows sorted by key, taken in one pass).

-- handoff of messages, v2: v1 with the marketing fence through pgcast_unmailable_reason_v1
-- (an unconfirmed contact is skipped, 'unconfirmed'). The locks of v1 (the contacts fence of
-- each account: shared; exclusive in every writer of the columns read, confirmed_at included
-- since 0019; then the message rows in id order), the fences now in the order of their keys.
CREATE FUNCTION pgcast_message_handoff_v2(p_token uuid, p_ids uuid[])
RETURNS TABLE (id uuid, account text, category text, to_address text, from_address text,
               reply_to text, subject text, text_body text, html_body text, headers jsonb,
               tags jsonb, attempts smallint)
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
DECLARE
    acct text;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'on', true);
    -- in the order of the locks' keys, as every writer that takes several accounts' fences
    -- (an untagged hard bounce: pgcast_ses_event_v1); by name v1 deadlocked with it
    FOR acct IN SELECT a.account FROM (SELECT DISTINCT m.account FROM messages m
                                       WHERE m.id = ANY (p_ids)) a
                ORDER BY hashtext(a.account), a.account LOOP
        PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.contacts'), hashtext(acct));
    END LOOP;
    locked := ARRAY(
        SELECT m.id FROM messages m
        WHERE m.id = ANY (p_ids) AND m.status = 'queued' AND m.claim_token = p_token
          AND m.lease_expires_at > clock_timestamp()
        ORDER BY m.id FOR UPDATE);
    UPDATE messages m
    SET status = 'skipped', finished_at = clock_timestamp(), claim_token = NULL,
        lease_expires_at = NULL, last_error = g.why
    FROM (SELECT q.id,
                 CASE WHEN q.to_address = 'erased@erased.invalid'
                           OR pgcast_erased_v1(q.account, q.to_address) THEN 'contact erased'
                      WHEN c.suppressed_at IS NOT NULL
                           THEN 'suppressed: ' || c.suppressed_reason
                      WHEN q.category = 'marketing' AND c.id IS NOT NULL
                           THEN pgcast_unmailable_reason_v1(c)
                 END AS why
          FROM messages q
          LEFT JOIN contacts c ON c.account = q.account AND lower(c.email) = lower(q.to_address)
          WHERE q.id = ANY (locked)) g
    WHERE m.id = g.id AND g.why IS NOT NULL;
    RETURN QUERY
    UPDATE messages m SET status = 'sending', handed_at = clock_timestamp()
    WHERE m.id = ANY (locked) AND m.status = 'queued'
    RETURNING m.id, m.account, m.category, m.to_address, m.from_address, m.reply_to,
              m.subject, m.text_body, m.html_body, m.headers, m.tags, m.attempts;
END
$$;

-- erase, v6: v3, then the account's messages to the address, locked in id order (as the
-- message handoff and record take them; v4 updated them in its plan's order), lose the
-- address as in v4 (a queued one is skipped; the placeholder address, no subject, no bodies)
-- and also their error texts and feedback diagnostics (SES quotes the address), and an
-- idempotency key that holds the address becomes 'erased:' || id (also in the message.*
-- webhook events that copied it, whose kept answers are dropped); a message to someone else
-- loses a reply-to or a key that holds the address. After v3's locks (the
-- erasure lock, the contact row, the contacts fence when there is a contact): message rows,
-- then webhook event and delivery rows.
CREATE FUNCTION pgcast_erase_v6(p_account text, p_email text, p_source text, p_actor jsonb)
RETURNS TABLE (contact_id bigint, recipients bigint, messages bigint)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := lower(btrim(p_email));
    v record;
    ids uuid[];
    rekeyed jsonb;
    n bigint;
BEGIN
    SELECT * INTO v FROM pgcast_erase_v3(p_account, p_email, p_source, p_actor);
    -- the messages to the address, and those to others that name it in their reply-to or
    -- their idempotency key (a contact form's answer to the person, a key built from it)
    ids := ARRAY(SELECT m.id FROM messages m
                 WHERE m.account = p_account
                   AND (lower(m.to_address) = addr OR strpos(lower(m.reply_to), addr) > 0
                        OR strpos(lower(m.idempotency_key), addr) > 0)
                 ORDER BY m.id FOR UPDATE);
    WITH changed AS (
        UPDATE messages m
        SET to_address = CASE WHEN lower(m.to_address) = addr THEN 'erased@erased.invalid'
                              ELSE m.to_address END,
            subject = CASE WHEN lower(m.to_address) = addr THEN '(erased)' ELSE m.subject END,
            text_body = CASE WHEN lower(m.to_address) = addr THEN '' ELSE m.text_body END,
            html_body = CASE WHEN lower(m.to_address) = addr THEN NULL ELSE m.html_body END,
            headers = CASE WHEN lower(m.to_address) = addr THEN '{}' ELSE m.headers END,
            tags = CASE WHEN lower(m.to_address) = addr THEN '{}' ELSE m.tags END,
            reply_to = CASE WHEN lower(m.to_address) = addr
                                 OR strpos(lower(m.reply_to), addr) > 0 THEN NULL
                            ELSE m.reply_to END,
            status = CASE WHEN lower(m.to_address) = addr AND m.status = 'queued'
                          THEN 'skipped' ELSE m.status END,
            last_error = CASE WHEN lower(m.to_address) <> addr THEN m.last_error
                              WHEN m.status = 'queued' THEN 'contact erased'
                              WHEN m.last_error IS NULL OR m.last_error LIKE 'in doubt:%'
                                   THEN m.last_error
                              ELSE 'contact erased: error text not kept' END,
            feedback_detail = CASE WHEN lower(m.to_address) <> addr THEN m.feedback_detail
                                   WHEN m.feedback_detail IS NOT NULL
                                   THEN 'contact erased: detail not kept' END,
            idempotency_key = CASE WHEN strpos(lower(m.idempotency_key), addr) > 0
                                   THEN 'erased:' || m.id ELSE m.idempotency_key END,
            finished_at = CASE WHEN lower(m.to_address) = addr
                               THEN coalesce(m.finished_at, clock_timestamp())
                               ELSE m.finished_at END,
            claim_token = CASE WHEN lower(m.to_address) = addr AND m.status = 'queued'
                               THEN NULL ELSE m.claim_token END
        WHERE m.id = ANY (ids)
        RETURNING m.id, m.idempotency_key
    )
    SELECT jsonb_object_agg(c.id::text, c.idempotency_key) FILTER (
               WHERE c.idempotency_key = 'erased:' || c.id),
           count(*)
    INTO rekeyed, n FROM changed c;
    IF rekeyed IS NOT NULL THEN
        UPDATE webhook_events e
        SET data = e.data || jsonb_build_object('idempotency_key',
                                                rekeyed ->> (e.data ->> 'message_id'))
        WHERE e.account = p_account AND e.type LIKE 'message.%'
          AND rekeyed ? (e.data ->> 'message_id');
        -- and the receivers' answers kept for them (one may echo what it got)
        UPDATE webhook_deliveries d SET response = NULL
        WHERE d.response IS NOT NULL
          AND d.event_id IN (SELECT e.id FROM webhook_events e
                             WHERE e.account = p_account AND e.type LIKE 'message.%'
                               AND rekeyed ? (e.data ->> 'message_id'));
    END IF;
    -- and the contact's opens and clicks in the account's broadcasts (as 0020's v5 did)
    IF v.contact_id IS NOT NULL THEN
        DELETE FROM tracking_events e
        WHERE e.contact_id = v.contact_id
          AND e.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
        DELETE FROM tracking_firsts f
        WHERE f.contact_id = v.contact_id
          AND f.broadcast_id IN (SELECT b.id FROM broadcasts b WHERE b.account = p_account);
    END IF;
    RETURN QUERY SELECT v.contact_id, v.recipients, n;
END
$$;

-- A message whose address was erased keeps no error text and no feedback diagnostic:
-- whoever writes one later (a record or an SES event after the erase, quoting the address),
-- a fixed text is stored instead. Fires only for the rare rows the erase rewrote.
CREATE FUNCTION pgcast_message_erased_text_v1()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.last_error IS NOT NULL AND NEW.last_error IS DISTINCT FROM OLD.last_error
       AND NEW.last_error NOT IN ('contact erased', 'contact erased: error text not kept')
       AND NEW.last_error NOT LIKE 'in doubt:%' THEN
        NEW.last_error := 'contact erased: error text not kept';
    END IF;
    IF NEW.feedback_detail IS NOT NULL
       AND NEW.feedback_detail IS DISTINCT FROM OLD.feedback_detail THEN
        NEW.feedback_detail := 'contact erased: detail not kept';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER messages_erased_text
    BEFORE UPDATE OF last_error, feedback_detail ON messages
    FOR EACH ROW
    WHEN (NEW.to_address = 'erased@erased.invalid')
    EXECUTE FUNCTION pgcast_message_erased_text_v1();

-- enqueue, v2: v1, except that a message to an erased address whose idempotency key holds the
-- address is stored without its key (the row is skipped whatever it says; a retry with the
-- same key is another skipped row, never the address kept), and an erased reply-to is not
-- stored (the message goes without it; nor a key that holds it).
CREATE FUNCTION pgcast_send_message_v2(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}')
RETURNS TABLE (id uuid, created boolean, status text)
LANGUAGE plpgsql AS $$
DECLARE
    addr text := btrim(coalesce(p_to, ''));
    sender text;
    allowed text[];
    mid uuid;
    st text;
    erased boolean;
    reply text := lower(btrim(coalesce(substring(p_reply_to FROM '<([^<>]*)>\s*$'),
                                       p_reply_to)));
    reply_erased boolean;
BEGIN
    IF p_account IS NULL OR char_length(p_account) NOT BETWEEN 1 AND 200 THEN
        RAISE EXCEPTION 'account must be 1-200 characters' USING ERRCODE = '22023';
    END IF;
    IF addr !~ '^[^@\s<>(),;:"\[\]\\]+@[^@\s<>(),;:"\[\]\\]+\.[^@\s<>(),;:"\[\]\\]+$'
       OR char_length(addr) > 254 THEN
        RAISE EXCEPTION 'to: % is not an email address', p_to USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_subject, '')) = '' THEN
        RAISE EXCEPTION 'subject must not be empty' USING ERRCODE = '22023';
    END IF;
    IF p_text IS NULL AND p_html IS NULL THEN
        RAISE EXCEPTION 'a message needs a text or an html body' USING ERRCODE = '22023';
    END IF;
    IF btrim(coalesce(p_from, '')) = '' THEN
        RAISE EXCEPTION 'from must not be empty' USING ERRCODE = '22023';
    END IF;
    IF coalesce(p_category, '') NOT IN ('transactional', 'marketing', 'confirmation') THEN
        RAISE EXCEPTION 'category must be transactional, marketing or confirmation, not %',
            p_category USING ERRCODE = '22023';
    END IF;
    -- the senders rule (0015): with senders, the From's address must be one or at one
    allowed := ARRAY(SELECT s.sender FROM senders s WHERE s.account = p_account);
    IF cardinality(allowed) > 0 THEN
        sender := lower(btrim(coalesce(substring(p_from FROM '<([^<>]*)>\s*$'), p_from)));
        IF NOT (sender = ANY (allowed) OR split_part(sender, '@', 2) = ANY (allowed)) THEN
            RAISE EXCEPTION 'from: % is not a sender this account may use', sender
                USING ERRCODE = '22023',
                      HINT = 'an operator allows more with `pgcast senders add`';
        END IF;
    END IF;
    -- an erase cannot commit between this check and the insert
    PERFORM pg_advisory_xact_lock_shared(hashtext('pgcast.erasure'), hashtext(p_account));
    erased := pgcast_erased_v1(p_account, addr);
    reply_erased := reply <> '' AND pgcast_erased_v1(p_account, reply);
    INSERT INTO messages AS m (account, idempotency_key, category, status, to_address,
                               from_address, reply_to, subject, text_body, html_body, headers,
                               tags, last_error, finished_at)
    VALUES (p_account,
            CASE WHEN (erased AND strpos(lower(p_key), lower(addr)) > 0)
                      OR (reply_erased AND strpos(lower(p_key), reply) > 0) THEN NULL
                 ELSE p_key END,
            p_category, CASE WHEN erased THEN 'skipped' ELSE 'queued' END,
            CASE WHEN erased THEN 'erased@erased.invalid' ELSE addr END, btrim(p_from),
            CASE WHEN NOT erased AND NOT coalesce(reply_erased, false) THEN p_reply_to END,
            CASE WHEN erased THEN '(erased)' ELSE p_subject END,
            CASE WHEN erased THEN '' ELSE p_text END, CASE WHEN NOT erased THEN p_html END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_headers, '{}') END,
            CASE WHEN erased THEN '{}' ELSE coalesce(p_tags, '{}') END,
            CASE WHEN erased THEN 'contact erased' END,
            CASE WHEN erased THEN clock_timestamp() END)
    ON CONFLICT (account, idempotency_key) DO NOTHING
    RETURNING m.id, m.status INTO mid, st;
    IF mid IS NOT NULL THEN
        IF st = 'queued' THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names (never renamed) wrap v2 from here on.
CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v2(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text,
                                               category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v2(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- SES feedback about a message, v2: v1, and a complaint also suppresses (and unsubscribes)
-- the contact of the message's account with its address, as a complaint about a broadcast
-- does (pgcast_contact_feedback_v1): an untagged complaint is only logged by
-- pgcast_ses_event_v2, so a person who complained about a marketing message kept getting
-- broadcasts. A hard bounce needs nothing more (pgcast_ses_event_v2 suppresses the address in
-- every account). Lock order as the erase's: the contact row (then the contacts fence, by
-- 0005's trigger), then the message row.
CREATE FUNCTION pgcast_message_feedback_v2(p_provider_id text, p_event text, p_at timestamptz,
                                           p_detail text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
    m record;
    cid bigint;
BEGIN
    IF p_event = 'complaint' THEN
        SELECT q.account, q.to_address INTO m FROM messages q
        WHERE q.provider_message_id = p_provider_id;
        IF FOUND THEN
            SELECT k.id INTO cid FROM contacts k
            WHERE k.account = m.account AND lower(k.email) = lower(m.to_address)
            FOR NO KEY UPDATE;
            IF cid IS NOT NULL THEN
                PERFORM pgcast_contact_feedback_v1(cid, p_event, p_detail, p_at, 0, NULL,
                                                   NULL);
            END IF;
        END IF;
    END IF;
    RETURN pgcast_message_feedback_v1(p_provider_id, p_event, p_at, p_detail);
END
$$;

-- record, v2: v1 with the claim's rows locked in id order first (ARRAY ... ORDER BY id FOR
-- UPDATE), then updated by key. v1 locked them in its plan's order (the in-flight index: lease
-- order) while renew v1 locked them in scan order: the two deadlocked on one claim's rows, and
-- Postgres aborted one (an outcome lost: the rows ended unknown; or the renewer stopped).
CREATE FUNCTION pgcast_message_record_v2(p_token uuid, p_ids uuid[], p_outcomes text[],
                                         p_message_ids text[], p_errors text[],
                                         p_retry_in double precision[])
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
    locked uuid[];
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    locked := ARRAY(SELECT q.id FROM messages q
                    WHERE q.id = ANY (p_ids) AND q.status = 'sending' AND q.claim_token = p_token
                    ORDER BY q.id FOR UPDATE);
    UPDATE messages m
    SET status = CASE o.outcome WHEN 'sent' THEN 'sent' WHEN 'failed' THEN 'failed'
                                WHEN 'unknown' THEN 'unknown' ELSE 'queued' END,
        attempts = m.attempts + CASE WHEN o.outcome IN ('throttled', 'release') THEN 0 ELSE 1 END,
        provider_message_id = coalesce(o.message_id, m.provider_message_id),
        last_error = CASE WHEN o.outcome = 'sent' THEN NULL ELSE o.error END,
        sent_at = CASE WHEN o.outcome = 'sent' THEN clock_timestamp() ELSE m.sent_at END,
        finished_at = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown')
                           THEN clock_timestamp() END,
        claim_token = CASE WHEN o.outcome IN ('sent', 'failed', 'unknown') THEN m.claim_token END,
        lease_expires_at = NULL,
        not_before = CASE WHEN o.outcome IN ('retry', 'throttled', 'release')
                          THEN clock_timestamp() + make_interval(secs => coalesce(o.retry_in, 0))
                          ELSE m.not_before END
    FROM unnest(p_ids, p_outcomes, p_message_ids, p_errors, p_retry_in)
         AS o(id, outcome, message_id, error, retry_in)
    WHERE m.id = o.id AND m.id = ANY (locked) AND m.status = 'sending'
      AND m.claim_token = p_token;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- renew, v2: v1 with the claims' rows locked in id order first, then updated by key (see
-- record v2), found by an index of the claimed rows (v1 read the whole table every renewal).
CREATE INDEX messages_claimed ON messages (claim_token)
    WHERE status IN ('queued', 'sending') AND claim_token IS NOT NULL;
CREATE FUNCTION pgcast_message_renew_v2(p_tokens uuid[], p_lease interval)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE messages m
    SET lease_expires_at = clock_timestamp() + p_lease,
        not_before = CASE WHEN m.status = 'queued' THEN clock_timestamp() + p_lease
                          ELSE m.not_before END
    WHERE m.id = ANY (ARRAY(SELECT q.id FROM messages q
                            WHERE q.claim_token = ANY (p_tokens) AND q.claim_token IS NOT NULL
                              AND q.status IN ('queued', 'sending')
                              AND q.lease_expires_at > clock_timestamp()
                            ORDER BY q.id FOR UPDATE))
      AND m.claim_token = ANY (p_tokens) AND m.status IN ('queued', 'sending')
      AND m.lease_expires_at > clock_timestamp();
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

DROP FUNCTION pgcast_message_handoff_v1(uuid, uuid[]);
DROP FUNCTION pgcast_send_message_v1(text, text, text, text, text, text, text, text, text, jsonb,
                                     jsonb);
DROP FUNCTION pgcast_message_record_v1(uuid, uuid[], text[], text[], text[],
                                       double precision[]);
DROP FUNCTION pgcast_message_renew_v1(uuid[], interval);
DROP FUNCTION pgcast_erase_v5(text, text, text, jsonb);
DROP FUNCTION pgcast_erase_v4(text, text, text, jsonb);
