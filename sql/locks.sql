-- Lock waits of the API (migration 0032's gaps): how long a request may wait for a lock.

-- lock_wait_limit --
-- How long the rest of this transaction may wait for any one lock, in ms (past it: SQLSTATE 55P03).
SELECT set_config('lock_timeout', %(ms)s::text, true)
