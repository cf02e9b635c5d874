-- 0023_review_fences: defects found reviewing issues 26-30 together.
-- * The message fence read only unsubscribed_at for marketing mail: a marketing message went to
--   a contact who signed up on a form and never confirmed (0019). pgcast_message_handoff_v2
--   reads the contact through pgcast_unmailable_reason_v1 for marketing (unsubscribed,
--   suppressed, unconfirmed), as the broadcast handoffs do; every category is still skipped
--   for a suppressed or erased address.

-- handoff of messages, v2: v1 with the marketing fence through pgcast_unmailable_reason_v1
-- (an unconfirmed contact is skipped, 'unconfirmed'). Same locks as v1: the contacts fence of
-- each account (shared; exclusive in every writer of the columns read, confirmed_at included
-- since 0019), then the message rows in id order.
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
    FOR acct IN SELECT DISTINCT m.account FROM messages m WHERE m.id = ANY (p_ids)
                ORDER BY 1 LOOP
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
