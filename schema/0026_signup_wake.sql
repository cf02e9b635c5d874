-- 0026_signup_wake (issue 28): a sign-up no longer NOTIFYs in its own transaction.
-- Measured (bench.signup, pg_stat_activity sampled every 10 ms, 200 sign-ups/s): on average 4
-- sessions, 7 while a broadcast drained, waited on Lock:object in the sign-up statement. That
-- is the lock a transaction that NOTIFYs takes at commit and holds through its commit's WAL
-- flush: every sign-up (pgcast_send_message_v2 NOTIFYs each queued message) committed behind
-- the previous one's fsync, one at a time, so one API process managed 100-136 sign-ups/s with
-- a p99 of seconds while the API process used a quarter of a core.
-- * pgcast_send_message_v3: v2 with p_notify (default true, as before): false queues the
--   message without the NOTIFY, and the caller wakes the message loops after its commit
--   (pgcast_notify_v2). The stable pgcast_send_message wraps v3 from here on (same behaviour).
-- * pgcast_send_confirmation_v2: v1 on v3 without the NOTIFY.
-- * pgcast_signup_v2: one POST /f/{id} in one statement, as pgcast_form_signup_v1, with the
--   confirmation through pgcast_send_confirmation_v2 (no NOTIFY in the sign-up's commit).
-- * pgcast_notify_v2: the message loops' wake-up on its own. The API calls it after the
--   sign-up has committed, in a statement of its own with an asynchronous commit (nothing else
--   is written: a crash loses a wake-up, which the loops' poll stands in for), and at most
--   one in flight per process, so many sign-ups share one NOTIFY (api/wake.py).

-- enqueue, v3: v2 with p_notify; false: no NOTIFY (the caller wakes the loops after commit).
CREATE FUNCTION pgcast_send_message_v3(p_account text, p_to text, p_subject text, p_text text,
                                       p_html text, p_from text, p_key text,
                                       p_category text DEFAULT 'transactional',
                                       p_reply_to text DEFAULT NULL,
                                       p_headers jsonb DEFAULT '{}',
                                       p_tags jsonb DEFAULT '{}',
                                       p_notify boolean DEFAULT true)
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
        IF st = 'queued' AND p_notify THEN
            PERFORM pg_notify('pgcast_control', '{"event": "message"}');
        END IF;
        RETURN QUERY SELECT mid, true, st;
        RETURN;
    END IF;
    RETURN QUERY SELECT m.id, false, m.status FROM messages m
    WHERE m.account = p_account AND m.idempotency_key = p_key;
END
$$;

-- The stable names (never renamed) wrap v3 from here on (they NOTIFY, as before).
CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key)
$$;

CREATE OR REPLACE FUNCTION pgcast_send_message(account text, to_address text, subject text,
                                               text_body text, html_body text,
                                               from_address text, idempotency_key text,
                                               category text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(account, to_address, subject, text_body, html_body,
                                          from_address, idempotency_key, category)
$$;

-- The confirmation of a sign-up, v2: v1 without the NOTIFY (the caller wakes the loops after
-- its commit, pgcast_notify_v2). The message's id (the same id for the same key).
CREATE FUNCTION pgcast_send_confirmation_v2(p_account text, p_to text, p_subject text,
                                            p_text text, p_html text, p_from text,
                                            p_idempotency_key text)
RETURNS uuid LANGUAGE sql AS $$
    SELECT id FROM pgcast_send_message_v3(p_account, p_to, p_subject, p_text, p_html, p_from,
                                          p_idempotency_key, 'confirmation',
                                          p_notify => false)
$$;

-- One POST /f/{id} in one statement, v2: pgcast_form_signup_v1 with the confirmation queued
-- by pgcast_send_confirmation_v2 (no NOTIFY: the caller calls pgcast_notify_v2('message')
-- after the commit when message_id is not null). No row when the form does not exist.
CREATE FUNCTION pgcast_signup_v2(p_form uuid, p_email text, p_name text, p_max_mails integer,
                                 p_details jsonb, p_subject text, p_text text, p_html text)
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
        mid := pgcast_send_confirmation_v2(s.account, p_email, p_subject, p_text, p_html,
                                           f.from_address, 'confirmation:' || s.event_id);
    END IF;
    RETURN QUERY SELECT s.outcome, mid, f.double_opt_in, f.redirect_url, f.embeddable;
END
$$;

-- Wake the workers' loops: {"event": p_event} on pgcast_control ('message': the message
-- loops look for queued messages). Called after the commit that made the work, in a statement
-- of its own (the API makes that statement's commit asynchronous: it writes nothing else).
CREATE FUNCTION pgcast_notify_v2(p_event text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_notify('pgcast_control', json_build_object('event', p_event)::text)
$$;
