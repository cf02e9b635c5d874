-- 0034_own_bucket_batches: a broadcast's own limit (`rate_limit`) is taken in batches.
-- Under its own bucket a broadcast was taken, handed off and recorded about one recipient at a
-- time: each worker process's taker woke when the next token was due (plus 25 ms of gather),
-- and with two processes taking turns each take found one or two tokens. At 100/s that was
-- some 90 handoffs and 90 records a second (each a synchronous commit) and twice as many
-- takes, beside the application's own traffic on the same database (issue 28's sign-ups).
-- pgcast_take_own_v1 grants nothing until the bucket holds half its burst (at least one, and
-- never more than asked for), and says how long until it will: every take then carries about
-- half a burst (5 at 100/s, whose burst is rate / 10), however many processes of this version
-- take. The rate is the same: the wait ends while the bucket still has half its burst of room,
-- so a wake-up up to that late (50 ms at 20/s and more) loses no refill; with a burst of one
-- (10/s and less) the batch is the whole bucket, as it was. An empty take writes nothing. Like the other takes it commits
-- asynchronously under the bucket's rate lock (a grant is made durable by the handoff's
-- synchronous commit that follows it), so it serialises with v5's takes of the same bucket
-- from a process not yet upgraded.
CREATE FUNCTION pgcast_take_own_v1(p_name text, p_want integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE plpgsql AS $$
DECLARE
    b rate_limits%ROWTYPE;
    t timestamptz;
    have double precision;
    need double precision;
    g integer;
BEGIN
    IF p_want IS NULL OR p_want <= 0 THEN
        RETURN QUERY SELECT 0, 0.0::double precision;  -- nothing asked, nothing taken
        RETURN;
    END IF;
    PERFORM set_config('synchronous_commit', 'off', true);
    PERFORM pg_advisory_xact_lock(hashtext('pgcast.rate'), hashtext(p_name));
    SELECT * INTO b FROM rate_limits WHERE name = p_name;
    IF NOT FOUND OR b.rate = 0 THEN
        RETURN QUERY SELECT p_want, 0.0::double precision;
        RETURN;
    END IF;
    t := clock_timestamp();
    have := least(b.burst, b.tokens + greatest(0, extract(epoch FROM t - b.refilled_at)) * b.rate);
    need := least(p_want, greatest(1, floor(b.burst / 2)));
    IF have < need THEN
        RETURN QUERY SELECT 0, (need - have) / b.rate;
        RETURN;
    END IF;
    -- floor before the cast: a burst beyond an integer's range must not fail the take
    g := floor(least(p_want::double precision, have))::integer;
    UPDATE rate_limits SET tokens = have - g, refilled_at = t WHERE name = p_name;
    RETURN QUERY SELECT g, 0.0::double precision;
END
$$;
