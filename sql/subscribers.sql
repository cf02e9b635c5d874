-- The subscriber's side (issue 28): sign-up forms, confirmations, topics and the preference
-- page, view in browser and the public archive. Every operator query is scoped to an account;
-- the public pages find their row by an id or a token's contact id.

-- form_create --
-- A new sign-up form (a name is unique in its account: no row when it is taken).
INSERT INTO forms (account, name, tags, from_address, double_opt_in, redirect_url, embeddable)
VALUES (%(account)s, %(name)s, %(tags)s, %(from_address)s, %(double_opt_in)s,
        %(redirect_url)s, %(embeddable)s)
ON CONFLICT (account, name) DO NOTHING
RETURNING id, name, tags, from_address, double_opt_in, redirect_url, embeddable, created_at

-- forms_list --
-- An account's forms by name.
SELECT id, name, tags, from_address, double_opt_in, redirect_url, embeddable, created_at
FROM forms WHERE account = %(account)s ORDER BY name, id

-- form_delete --
-- Deletes one form of an account (its confirmation links then confirm nothing).
DELETE FROM forms WHERE account = %(account)s AND id = %(id)s RETURNING id

-- form_public --
-- What the public form page needs (no account check: the id is the capability).
SELECT id, account, name, double_opt_in, redirect_url, embeddable FROM forms WHERE id = %(id)s

-- signup --
-- One sign-up on a form and its confirmation mail when due, one statement
-- (pgcast_signup_v2, no NOTIFY: wake_messages follows the commit when message_id is set);
-- no row when the form does not exist.
SELECT * FROM pgcast_signup_v2(%(form)s, %(email)s, %(name)s, %(max_mails)s,
                               %(details)s::jsonb, %(subject)s, %(text)s, %(html)s)

-- wake_messages --
-- Wakes the workers' message loops after a commit that queued messages without a NOTIFY
-- (pgcast_notify_v2); an asynchronous commit: the statement writes nothing else.
SELECT set_config('synchronous_commit', 'off', true), pgcast_notify_v2('message')

-- confirm --
-- Confirms a sign-up (pgcast_confirm_v1): ok, and where the form sends the browser.
SELECT * FROM pgcast_confirm_v1(%(email)s, %(form)s, to_timestamp(%(issued)s),
                                %(details)s::jsonb)

-- topic_add --
-- Marks a tag of an account as a public topic (or relabels it).
INSERT INTO topics (account, tag, label) VALUES (%(account)s, %(tag)s, %(label)s)
ON CONFLICT (account, tag) DO UPDATE SET label = EXCLUDED.label
RETURNING tag, label, created_at

-- topics_list --
-- An account's public topics by tag.
SELECT tag, label, created_at FROM topics WHERE account = %(account)s ORDER BY tag

-- topic_remove --
-- Stops offering a tag as a topic (contacts keep the tag).
DELETE FROM topics WHERE account = %(account)s AND tag = %(tag)s RETURNING tag

-- preferences_page --
-- The contact a preference token names, with every topic of its account and whether the
-- contact has it; no row when the contact is gone (a version 1 token's account prefix
-- must match, as for one-click unsubscribe).
SELECT c.id, c.unsubscribed_at IS NOT NULL AS unsubscribed,
       coalesce((SELECT jsonb_agg(jsonb_build_object('tag', t.tag, 'label', t.label,
                                                     'chosen', t.tag = ANY (c.tags))
                                  ORDER BY t.label, t.tag)
                 FROM topics t WHERE t.account = c.account), '[]') AS topics
FROM contacts c
WHERE c.id = %(contact_id)s
  AND (%(account_prefix)s::bytea IS NULL
       OR substring(convert_to(c.account, 'UTF8') FROM 1 FOR 200) = %(account_prefix)s::bytea)

-- preferences_save --
-- Sets the contact's topics to the chosen ones (pgcast_preferences_v1).
SELECT * FROM pgcast_preferences_v1(%(contact_id)s, %(chosen)s, %(broadcast_id)s)

-- preferences_unsubscribe --
-- "Unsubscribe from everything" on the preference page: as one-click, source preferences.
WITH target AS (
    SELECT id, account FROM contacts WHERE id = %(contact_id)s FOR UPDATE
), changed AS (
    UPDATE contacts c SET unsubscribed_at = clock_timestamp(), updated_at = now()
    FROM target t
    WHERE c.id = t.id AND c.unsubscribed_at IS NULL
    RETURNING c.id, c.account
), logged AS (
    INSERT INTO contact_events (account, contact_id, action, source, actor, broadcast_id)
    SELECT account, id, 'unsubscribe', 'preferences', '{"via": "preferences"}',
           %(broadcast_id)s
    FROM changed
    RETURNING 1
)
SELECT t.id, (SELECT count(*) FROM logged) AS changed FROM target t

-- web_view --
-- What /v/{token} renders: the broadcast (never a draft or a scheduled one) and the contact
-- as it is now, only if the contact was one of its recipients.
SELECT b.id, b.account, b.subject, b.from_address, b.text_body, b.html_body,
       c.id AS contact_id, c.email, c.name, c.attributes, c.tags
FROM broadcasts b
JOIN broadcast_recipients_all r ON r.broadcast_id = b.id AND r.contact_id = %(contact_id)s
JOIN contacts c ON c.id = %(contact_id)s AND c.account = b.account
WHERE b.id = %(broadcast_id)s AND b.status NOT IN ('draft', 'scheduled')

-- archive_enable --
-- Gives an account its public archive page at /a/{slug} (or moves it); no row when the
-- slug belongs to another account.
INSERT INTO archives (account, slug) VALUES (%(account)s, %(slug)s)
ON CONFLICT (account) DO UPDATE SET slug = EXCLUDED.slug
RETURNING account, slug

-- archive_list --
-- The sent broadcasts an account archives, newest first, for its /a/{slug} page.
SELECT b.id, b.subject, b.finished_at
FROM archives a JOIN broadcasts b ON b.account = a.account
WHERE a.slug = %(slug)s AND b.archive AND b.status = 'sent'
ORDER BY b.finished_at DESC, b.id
LIMIT 200

-- archive_broadcast --
-- One archived sent broadcast of the account whose archive is /a/{slug}.
SELECT b.id, b.account, b.subject, b.from_address, b.text_body, b.html_body
FROM archives a JOIN broadcasts b ON b.account = a.account
WHERE a.slug = %(slug)s AND b.id = %(id)s AND b.archive AND b.status = 'sent'

-- broadcast_set_archive --
-- Lists (or unlists) a broadcast of an account on its archive page.
UPDATE broadcasts SET archive = %(archive)s, updated_at = now()
WHERE id = %(id)s AND account = %(account)s
RETURNING id, archive

-- archive_exists --
-- Whether a slug names an archive page (an empty archive is a page, an unknown slug is not).
SELECT account FROM archives WHERE slug = %(slug)s
