-- Senders (0015): the From addresses and domains an operator allows an account. An account
-- with none may use any From; with some, its From must be one (an address) or at one (a
-- domain) to be sent, scheduled or test-sent.

-- senders_add --
-- Allow an account to send as an address or a domain; added = false when it already was.
INSERT INTO senders (account, sender) VALUES (%(account)s, %(sender)s)
ON CONFLICT (account, sender) DO NOTHING
RETURNING account, sender, created_at

-- senders_remove --
-- Stop allowing an address or a domain; no row when it was not allowed.
DELETE FROM senders WHERE account = %(account)s AND sender = %(sender)s
RETURNING account, sender

-- senders_list --
-- The senders of one account (or of every account when account is NULL), by account.
SELECT account, sender, created_at FROM senders
WHERE %(account)s::text IS NULL OR account = %(account)s
ORDER BY account, sender

-- broadcast_senders --
-- A broadcast's From and the senders its account may use (an empty array: any From).
SELECT b.from_address,
       ARRAY(SELECT s.sender FROM senders s WHERE s.account = b.account
             ORDER BY s.sender) AS senders
FROM broadcasts b WHERE b.id = %(id)s AND b.account = %(account)s
