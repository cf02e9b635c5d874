-- 0037_fresh_floor_scan (issue 32, the database cost per recipient): where fresh rows begin,
-- asked at a drain's end, without walking the partition's key over every row claimed.
--
-- fresh_floor, v2: the lowest fresh contact_id >= p_from, or NULL, as v1, found in two parts:
-- v1's walk of the key over the next 10,000 ids, then, if none is fresh there, the lowest
-- beyond them by one pass over the partition's heap (pgcast_fresh_beyond_v1).
-- * Measured (a 1,000,000-recipient drain by two workers, bench.profile_db): each worker asks
--   when its claims find no fresh row after their cursor, which is at the drain's end. v1
--   walked the key from the worker's floor (0 the first time) over every row claimed since,
--   fetching each from the heap: 0.56 s on the drained partition (bench.fresh_floor), 0.9-2.0 s
--   of server time for the drain's calls, while the last groups were being recorded. A pass
--   over the heap took 0.15 s on the same partition.
-- * A plain read, as v1: a fresh row another transaction has locked counts (a claim about to
--   commit it, or to roll back), so the answer is right whoever holds what.
-- * The walk first: a later look starts at the floor an earlier one found, where the next
--   fresh row is usually close; the pass over the heap is for the stretch beyond.
CREATE FUNCTION pgcast_fresh_beyond_v1(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_indexscan = off
SET enable_indexonlyscan = off
SET enable_bitmapscan = off
AS $$
BEGIN
    RETURN (SELECT min(l.contact_id) FROM broadcast_recipients l
            WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
              AND l.contact_id >= p_from);
END
$$;

CREATE FUNCTION pgcast_fresh_floor_v2(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
SET enable_seqscan = off
SET enable_bitmapscan = off
AS $$
DECLARE
    walk constant bigint := 10000;  -- ids whose rows the walk may fetch
    found bigint;
BEGIN
    IF p_from > 9223372036854775807 - walk THEN
        RETURN pgcast_fresh_floor_v1(p_id, p_from);  -- the last ids there are: v1's walk
    END IF;
    found := (SELECT l.contact_id FROM broadcast_recipients l
              WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
                AND l.contact_id >= p_from AND l.contact_id < p_from + walk
              ORDER BY l.contact_id
              LIMIT 1);
    IF found IS NOT NULL THEN
        RETURN found;
    END IF;
    RETURN pgcast_fresh_beyond_v1(p_id, p_from + walk);
END
$$;
