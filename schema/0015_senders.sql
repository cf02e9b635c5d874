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
