-- 0011: one limit shared fairly. When a shared bucket (the global one) is the constraint,
-- its tokens are shared in two levels: across accounts, by an operator-set weight
-- (rate_weights, default 1), then across an account's broadcasts, by their priority (1-10).
--
-- Start-time fair queueing over the token bucket. Every account and every broadcast that
-- takes from a shared bucket has a virtual time: the tokens it was granted over its weight.
-- A taker that asked for more than it got lately is *waiting* (the bucket is its
-- constraint). A taker may run at most half a burst of tokens ahead of the most-behind
-- waiting peer (an account among the accounts, a broadcast among its account's broadcasts);
-- beyond that it gets only what the bucket would otherwise soon lose: once the bucket is
-- within a token of full, the tokens above half of it. So the total stays at the limit (work-conserving: what a taker
-- does not use goes to the others), and the bucket's own guarantees hold (every grant comes
-- out of the one bucket, under its lock). A taker that starts, or comes back after needing
-- less, begins at the level's virtual clock (the start time of the latest grant): no credit
-- is banked while idle. A grant costs one scan of the level's recent takers: O(active
-- accounts + the account's active broadcasts).

-- An account's weight in a shared bucket, set by the operator (`pgcast rate weight`), never
-- through the tenant API. No row: weight 1.
CREATE TABLE rate_weights (
    account    text        PRIMARY KEY,
    weight     integer     NOT NULL CHECK (weight BETWEEN 1 AND 1000),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- the account level's virtual clock, per bucket
ALTER TABLE rate_limits ADD COLUMN vclock double precision NOT NULL DEFAULT 0;

-- Takers of a shared bucket: soft state, rewritten by every grant. A row not asked for in a
-- minute is pruned by the sweeper (its taker starts again at the clock, as after any pause).
CREATE TABLE rate_account_shares (
    bucket     text             NOT NULL,
    account    text             NOT NULL,
    vtime      double precision NOT NULL,  -- tokens granted / account weight
    vclock     double precision NOT NULL,  -- the broadcast level's clock in this account
    asked_at   timestamptz      NOT NULL,
    waiting_at timestamptz,                -- last ask that got less than it wanted
    PRIMARY KEY (bucket, account)
);
CREATE TABLE rate_broadcast_shares (
    bucket       text             NOT NULL,
    broadcast_id uuid             NOT NULL,
    account      text             NOT NULL,
    vtime        double precision NOT NULL,  -- tokens granted / priority
    asked_at     timestamptz      NOT NULL,
    waiting_at   timestamptz,
    PRIMARY KEY (bucket, broadcast_id)
);
CREATE INDEX rate_broadcast_shares_account ON rate_broadcast_shares (bucket, account);

-- How long after its last unsatisfied ask a taker still counts as waiting, in seconds: twice
-- the longest a waiting taker sleeps before it asks again (a burst's worth of refill), and
-- 50 ms for the round trip; at least 100 ms, at most 1.5 s (workers sleep at most 1 s).
CREATE FUNCTION pgcast_waiting_horizon_v1(p_rate double precision, p_burst double precision)
RETURNS double precision LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_rate > 0 THEN greatest(0.1, least(1.5, 0.05 + 2 * p_burst / p_rate))
                ELSE 0.1 END
$$;

-- take, v2 replaces v1 (a worker that still calls v1 fails loudly: restart it after migrating)
DROP FUNCTION pgcast_take_tokens_v1(text, integer);

-- take, v2: v1 plus the fair share of a broadcast's account and of the broadcast within it
-- (p_broadcast NULL, or a broadcast that does not exist: v1's first come, first served).
-- `ahead`: nothing was granted because the taker is ahead of a waiting peer (wait_seconds is
-- then when the bucket will be nearly full), not because the bucket is empty.
CREATE FUNCTION pgcast_take_tokens_v2(p_name text, p_want integer, p_broadcast uuid)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    recent timestamptz;
    have double precision;
    g integer;
    acct text;
    prio double precision;
    w double precision;
    quantum double precision;
    fair double precision := 'Infinity';
    a_row rate_account_shares%ROWTYPE;
    b_row rate_broadcast_shares%ROWTYPE;
    a_new boolean;
    b_new boolean;
    a_min double precision;
    b_min double precision;
    a_start double precision;
    b_start double precision;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision, false;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    SELECT br.account, br.priority INTO acct, prio FROM broadcasts br WHERE br.id = p_broadcast;
    IF acct IS NULL THEN
        -- floor before the cast: a burst beyond an integer's range must not fail the take
        g := floor(greatest(0, least(p_want::double precision, have)))::integer;
        UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
        RETURN QUERY SELECT g, CASE WHEN g > 0 THEN 0.0 ELSE (1 - (have - g)) / b.rate END, false;
        RETURN;
    END IF;
    w := coalesce((SELECT rw.weight FROM rate_weights rw WHERE rw.account = acct), 1);
    recent := t - make_interval(secs => pgcast_waiting_horizon_v1(b.rate, b.burst));
    quantum := greatest(1, b.burst / 2);

    -- the most-behind waiting peers
    SELECT min(s.vtime) INTO a_min FROM rate_account_shares s
    WHERE s.bucket = p_name AND s.account <> acct AND s.waiting_at > recent;
    SELECT min(s.vtime) INTO b_min FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.account = acct AND s.broadcast_id <> p_broadcast
      AND s.waiting_at > recent;

    -- this taker's rows; one that was not waiting starts at the clock (no banked credit)
    SELECT * INTO a_row FROM rate_account_shares s WHERE s.bucket = p_name AND s.account = acct;
    a_new := NOT FOUND;
    IF a_new THEN
        a_row.bucket := p_name;
        a_row.account := acct;
        a_row.vtime := b.vclock;
        a_row.vclock := 0;
    ELSIF a_row.waiting_at IS NULL OR a_row.waiting_at <= recent THEN
        a_row.vtime := greatest(a_row.vtime, b.vclock);
    END IF;
    SELECT * INTO b_row FROM rate_broadcast_shares s
    WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    b_new := NOT FOUND;
    IF b_new THEN
        b_row.bucket := p_name;
        b_row.broadcast_id := p_broadcast;
        b_row.account := acct;
        b_row.vtime := a_row.vclock;
    ELSIF b_row.waiting_at IS NULL OR b_row.waiting_at <= recent THEN
        b_row.vtime := greatest(b_row.vtime, a_row.vclock);
    END IF;

    -- tokens this taker may have before it runs a quantum ahead of a waiting peer
    IF a_min IS NOT NULL THEN
        fair := least(fair, quantum - (a_row.vtime - a_min) * w);
    END IF;
    IF b_min IS NOT NULL THEN
        fair := least(fair, quantum - (b_row.vtime - b_min) * prio);
    END IF;
    IF fair >= 1 THEN
        g := floor(greatest(0, least(p_want::double precision, have, fair)))::integer;
    ELSIF have >= b.burst - 1 THEN
        -- ahead, but the bucket is about to be full: what it would otherwise lose, the tokens
        -- above half of it (at least one, so a bucket of one or two loses nothing either)
        g := floor(greatest(0, least(p_want::double precision, have,
                                     greatest(have - b.burst / 2, 1))))::integer;
    ELSE
        g := 0;
    END IF;

    a_start := a_row.vtime;
    b_start := b_row.vtime;
    a_row.vtime := a_row.vtime + g / w;
    b_row.vtime := b_row.vtime + g / prio;
    a_row.asked_at := t;
    b_row.asked_at := t;
    IF g < p_want THEN
        a_row.waiting_at := t;
        b_row.waiting_at := t;
    END IF;
    IF g > 0 THEN
        a_row.vclock := greatest(a_row.vclock, b_start);
    END IF;
    IF a_new THEN
        INSERT INTO rate_account_shares (bucket, account, vtime, vclock, asked_at, waiting_at)
        VALUES (p_name, acct, a_row.vtime, a_row.vclock, t, a_row.waiting_at);
    ELSE
        UPDATE rate_account_shares s
        SET vtime = a_row.vtime, vclock = a_row.vclock, asked_at = t, waiting_at = a_row.waiting_at
        WHERE s.bucket = p_name AND s.account = acct;
    END IF;
    IF b_new THEN
        INSERT INTO rate_broadcast_shares (bucket, broadcast_id, account, vtime, asked_at,
                                           waiting_at)
        VALUES (p_name, p_broadcast, acct, b_row.vtime, t, b_row.waiting_at);
    ELSE
        UPDATE rate_broadcast_shares s
        SET vtime = b_row.vtime, asked_at = t, waiting_at = b_row.waiting_at
        WHERE s.bucket = p_name AND s.broadcast_id = p_broadcast;
    END IF;
    UPDATE rate_limits
    SET tokens = have - g, refilled_at = t,
        vclock = CASE WHEN g > 0 THEN greatest(vclock, a_start) ELSE vclock END
    WHERE name = p_name;
    RETURN QUERY SELECT g, CASE
        WHEN g > 0 THEN 0.0
        WHEN have < 1 THEN (1 - have) / b.rate
        -- ahead of a waiting peer: it is served first; look again when the bucket is full
        ELSE greatest(1 - (have - floor(have)), b.burst - 1 - have) / b.rate END,
        g = 0 AND have >= 1;
END
$$;

-- give back: tokens a taker took from a bucket of its own (a broadcast's cap) and could not
-- use, because the global bucket or the in-flight window granted fewer. Under the bucket's
-- lock, never above its burst.
CREATE FUNCTION pgcast_give_back_tokens_v1(p_name text, p_tokens integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    IF p_tokens <= 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    t := clock_timestamp();
    UPDATE rate_limits
    SET tokens = least(burst, tokens + greatest(0, extract(epoch FROM t - refilled_at)) * rate
                              + p_tokens),
        refilled_at = t
    WHERE name = p_name AND rate > 0;
END
$$;

-- prune: forget takers not heard from in a minute (they start again at the clock, as after
-- any pause), each bucket under its own lock, buckets in name order: a take holds that lock
-- while it updates its rows, so the two never wait for each other's rows.
CREATE FUNCTION pgcast_rate_prune_v1() RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    bk text;
    n integer := 0;
    k integer;
BEGIN
    FOR bk IN SELECT bucket FROM rate_account_shares UNION SELECT bucket FROM rate_broadcast_shares
              ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(bk));
        DELETE FROM rate_broadcast_shares
        WHERE bucket = bk AND asked_at < clock_timestamp() - interval '1 minute';
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
        DELETE FROM rate_account_shares
        WHERE bucket = bk AND asked_at < clock_timestamp() - interval '1 minute';
        GET DIAGNOSTICS k = ROW_COUNT;
        n := n + k;
    END LOOP;
    RETURN n;
END
$$;

-- The shares of the takers of the last two seconds (a waiting worker asks again within one): an account's part of the bucket's rate is its
-- weight over the weights of the accounts taking, a broadcast's part of that is its priority
-- over its account's broadcasts' priorities, capped by its own rate limit. A taker that uses
-- less leaves the rest to the others (the figure is its entitlement, not what it sends).
-- `waiting`: it asked for more than it got lately (the bucket is its constraint).
CREATE VIEW rate_shares_active AS
WITH takers AS (
    SELECT s.bucket, s.account, coalesce(rw.weight, 1) AS account_weight, s.broadcast_id,
           br.priority, br.rate_limit,
           s.waiting_at > clock_timestamp() - make_interval(
               secs => pgcast_waiting_horizon_v1(l.rate, l.burst)) IS TRUE AS waiting
    FROM rate_broadcast_shares s
    JOIN rate_limits l ON l.name = s.bucket
    JOIN broadcasts br ON br.id = s.broadcast_id AND br.status = 'sending'
    LEFT JOIN rate_weights rw ON rw.account = s.account
    WHERE s.asked_at > clock_timestamp() - interval '2 seconds'
), accounts AS (
    SELECT bucket, account, max(account_weight) AS account_weight, sum(priority) AS priorities
    FROM takers GROUP BY bucket, account
), buckets AS (
    SELECT bucket, sum(account_weight) AS weights FROM accounts GROUP BY bucket
)
SELECT t.bucket, t.account, t.account_weight, t.broadcast_id, t.priority,
       least(t.rate_limit,
             l.rate * t.account_weight / bk.weights * t.priority / a.priorities)
           AS share_per_second,
       t.waiting
FROM takers t
JOIN accounts a ON a.bucket = t.bucket AND a.account = t.account
JOIN buckets bk ON bk.bucket = t.bucket
JOIN rate_limits l ON l.name = t.bucket AND l.rate > 0;

-- progress, v3: 0004's columns and the broadcast's current share of the global rate
-- (NULL: it is not taking tokens now, or there is no global limit)
CREATE OR REPLACE VIEW broadcast_progress AS
SELECT b.id AS broadcast_id,
       b.account,
       b.status,
       b.total,
       b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled AS pending,
       b.sent,
       b.failed,
       b.skipped,
       b.unknown,
       b.cancelled,
       b.epoch,
       b.paused_reason,
       b.created_at,
       b.started_at,
       b.finished_at,
       b.scheduled_at,
       b.delivered,
       b.bounced,
       b.complained,
       s.share_per_second
FROM broadcasts b
LEFT JOIN rate_shares_active s ON s.broadcast_id = b.id AND s.bucket = 'global';
