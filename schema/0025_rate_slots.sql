-- 0025_rate_slots (issue 26): one wire schedule for every process and host.
-- The bucket bounded the grants, but each worker process spaced its own calls at the full
-- global rate, so grants made in one second could reach SES together in the next (two
-- processes each sending a backlog of granted tokens at full rate for a moment: 106 and 116
-- calls in the busiest second at the endpoint against rate + burst = 105).
-- * rate_limits.next_slot: the bucket's "theoretical arrival time" of the next call (GCRA,
--   virtual scheduling). Each take that grants g tokens also books g wire slots, under the
--   same advisory lock: the first at greatest(now + lead, next_slot), one every 1 / rate after
--   it; next_slot moves past the last. The slots of all takes never overlap, so no window of
--   w seconds holds more than rate x w + 1 of them, whoever took them.
-- * The slots come back as an offset in seconds from the database's clock_timestamp() (and
--   that clock as epoch seconds), so a worker maps them to its own monotonic clock without
--   any clock sync between hosts (worker.ratelimit.Slots). p_lead (0 to 1 s): how far ahead
--   of now the caller's first slot may be at the earliest, the time it needs from the grant
--   to the wire (its handoff commit, its threads); a late call is the only source of bunching,
--   and the bucket's burst is left as slack for it.
-- * A rate change rescales the schedule already booked to the new rate at once (the BEFORE
--   trigger rate_limits_schedule, pgcast_rate_changed_v2): the calls already booked still
--   count, at the new rate. To or from unlimited (0), the schedule is forgotten.
-- * Unlimited (rate 0): no slot is booked and nothing is returned (NULL offset).
ALTER TABLE rate_limits ADD COLUMN next_slot timestamptz;

-- take, v5: v4 (the bucket, fair shares, the messages' reserve), then the granted tokens' wire
-- slots. slot_offset: seconds from taken_at (the database's clock_timestamp(), epoch seconds)
-- to the first slot; slot_spacing: seconds between slots (1 / rate). NULL: no slot (nothing
-- granted, or no limit). slot_slack: (burst - 1) / rate, the lateness the bucket's burst
-- absorbs (a call later than that for its slot could make a second hold more than rate + burst).
CREATE FUNCTION pgcast_take_tokens_v5(p_name text, p_want integer, p_broadcast uuid,
                                      p_lead double precision)
RETURNS TABLE (granted integer, wait_seconds double precision, ahead boolean,
               slot_offset double precision, slot_spacing double precision,
               taken_at double precision, slot_slack double precision)
LANGUAGE plpgsql AS $$
DECLARE
    g integer;
    w double precision;
    a boolean;
    t timestamptz;
    first timestamptz;
    r double precision;
    k double precision;
BEGIN
    -- v4 takes the bucket's rate lock (held to the end of the transaction) and commits
    -- asynchronously: the slots are booked under the same lock, in the same transaction
    SELECT v.granted, v.wait_seconds, v.ahead INTO g, w, a
    FROM pgcast_take_tokens_v4(p_name, p_want, p_broadcast) v;
    IF g > 0 THEN
        t := clock_timestamp();
        -- one statement on the row as it is now: a rate change that committed meanwhile
        -- (rescaled by its trigger) is the one the slots follow
        UPDATE rate_limits l
        SET next_slot = greatest(l.next_slot, t + make_interval(
                                     secs => least(1, greatest(0, coalesce(p_lead, 0)))))
                        + make_interval(secs => g / l.rate)
        WHERE l.name = p_name AND l.rate > 0
        RETURNING l.next_slot - make_interval(secs => g / l.rate), l.rate,
                  greatest(0, l.burst - 1) / l.rate INTO first, r, k;
        IF FOUND THEN
            RETURN QUERY SELECT g, w, a, extract(epoch FROM first - t)::double precision,
                                1 / r, extract(epoch FROM t)::double precision, k;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT g, w, a, NULL::double precision, NULL::double precision,
                        NULL::double precision, NULL::double precision;
END
$$;

-- take for messages, v2: v1 (ahead of broadcasts, up to their share), then the granted tokens'
-- wire slots from the same schedule as v5's.
CREATE FUNCTION pgcast_take_tokens_messages_v2(p_name text, p_want integer,
                                               p_lead double precision)
RETURNS TABLE (granted integer, wait_seconds double precision,
               slot_offset double precision, slot_spacing double precision,
               taken_at double precision, slot_slack double precision)
LANGUAGE plpgsql AS $$
DECLARE
    g integer;
    w double precision;
    t timestamptz;
    first timestamptz;
    r double precision;
    k double precision;
BEGIN
    SELECT v.granted, v.wait_seconds INTO g, w
    FROM pgcast_take_tokens_messages_v1(p_name, p_want) v;
    IF g > 0 THEN
        t := clock_timestamp();
        UPDATE rate_limits l
        SET next_slot = greatest(l.next_slot, t + make_interval(
                                     secs => least(1, greatest(0, coalesce(p_lead, 0)))))
                        + make_interval(secs => g / l.rate)
        WHERE l.name = p_name AND l.rate > 0
        RETURNING l.next_slot - make_interval(secs => g / l.rate), l.rate,
                  greatest(0, l.burst - 1) / l.rate INTO first, r, k;
        IF FOUND THEN
            RETURN QUERY SELECT g, w, extract(epoch FROM first - t)::double precision, 1 / r,
                                extract(epoch FROM t)::double precision, k;
            RETURN;
        END IF;
    END IF;
    RETURN QUERY SELECT g, w, NULL::double precision, NULL::double precision,
                        NULL::double precision, NULL::double precision;
END
$$;

-- For software other than pgcast, with its slots: up to n tokens from the global bucket with
-- the priority of messages, and their wire slots (no lead: the first slot is now, or where the
-- schedule is). Send the i-th granted call (from 0) slot_offset + i x slot_spacing seconds
-- after the answer; NULL offset: no limit, send at once.
CREATE FUNCTION pgcast_take_tokens_external_v2(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision,
               slot_offset double precision, slot_spacing double precision)
LANGUAGE sql AS $$
    SELECT v.granted, v.wait_seconds, v.slot_offset, v.slot_spacing
    FROM pgcast_take_tokens_messages_v2('global', n, 0) v
$$;

-- The stable name (its signature never changes), now on the schedule: `granted` tokens; when
-- granted is 0, wait wait_seconds and ask again; when it is more, wait wait_seconds (the
-- offset of the first booked slot: 0 while the schedule is idle) and send no faster than one
-- call every 1 / rate. A caller that sends at once is early by at most wait_seconds.
CREATE OR REPLACE FUNCTION pgcast_take_tokens_external(n integer)
RETURNS TABLE (granted integer, wait_seconds double precision)
LANGUAGE sql AS $$
    SELECT v.granted, CASE WHEN v.granted > 0 THEN greatest(0, coalesce(v.slot_offset, 0))
                           ELSE v.wait_seconds END
    FROM pgcast_take_tokens_external_v2(n) v
$$;

-- A rate change reaches the schedule at once: the slots already booked ahead of now (k of
-- them at the old rate) take k / new rate from now at the new one; to or from unlimited, the
-- schedule is forgotten. (The NOTIFY stays with rate_limits_changed, pgcast_rate_changed_v1.)
CREATE FUNCTION pgcast_rate_changed_v2() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    t timestamptz;
BEGIN
    IF NEW.rate IS DISTINCT FROM OLD.rate THEN
        t := clock_timestamp();
        IF NEW.rate > 0 AND OLD.rate > 0 AND OLD.next_slot > t THEN
            NEW.next_slot := t + (OLD.next_slot - t) * (OLD.rate / NEW.rate);
        ELSE
            NEW.next_slot := NULL;
        END IF;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER rate_limits_schedule BEFORE UPDATE OF rate ON rate_limits
    FOR EACH ROW EXECUTE FUNCTION pgcast_rate_changed_v2();
