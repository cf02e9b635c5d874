-- 0006_unsubscribe_key: the key one-click unsubscribe tokens are made with when
-- PGCAST_UNSUBSCRIBE_SECRET is not set (the file and null providers): generated once, here,
-- so that the API and every worker agree on it. Two v4 UUIDs from Postgres's strong random
-- source: 244 random bits, as 64 hex characters.
CREATE TABLE unsubscribe_keys (
    id         boolean     PRIMARY KEY DEFAULT true CHECK (id),
    secret     text        NOT NULL
        DEFAULT replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO unsubscribe_keys DEFAULT VALUES;
