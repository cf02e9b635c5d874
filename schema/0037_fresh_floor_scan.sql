-- 0037_fresh_floor_scan (issue 32, the database cost per recipient): where fresh rows begin,
-- asked at a drain's end, is answered by one pass over the partition's heap when none is left.
--
-- fresh_floor, v2: whether any fresh row >= p_from is left at all first (the planner's
-- choice: a sequential scan of the partition when p_from is low), then v1's walk of the key
-- when one is.
-- * Measured (a 1,000,000-recipient drain by two workers, bench.profile_db): each worker asks
--   once per broadcast, when its claims find no fresh row after their cursor, which is at the
--   drain's end; v1 walks the partition's key from the worker's floor (0 the first time)
--   over every row claimed since, fetching each from the heap: 0.54 s on the drained
--   partition (1.7 s of server time for the drain's two calls), while the last groups were
--   being recorded. The scan that says none is left took 0.14 s on the same partition.
-- * A fresh row left behind (a claim that locked it rolled back) is found as before: the scan
--   stops at the first fresh row it meets, and v1's walk gives the lowest.
CREATE FUNCTION pgcast_fresh_floor_v2(p_id uuid, p_from bigint)
RETURNS bigint
LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM broadcast_recipients l
                   WHERE l.broadcast_id = p_id AND l.status = 'pending' AND l.worker IS NULL
                     AND l.contact_id >= p_from) THEN
        RETURN NULL;
    END IF;
    RETURN pgcast_fresh_floor_v1(p_id, p_from);
END
$$;
