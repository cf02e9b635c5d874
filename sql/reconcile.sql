-- Queries of the reconciliation of `unknown` recipients (issue 25).

-- reconcile_candidates --
-- Broadcasts (of one, or all) with unknown rows a requeue concerns now (handed off more than
-- `after` ago, never requeued), oldest first: a plain read, through the partial index of
-- finished rows, so a sweep locks no broadcast whose unknown rows were all requeued already.
SELECT b.id FROM broadcasts b
WHERE b.unknown > 0 AND b.status IN ('sending', 'paused', 'sent', 'failed')
  AND (%(id)s::uuid IS NULL OR b.id = %(id)s::uuid)
  AND EXISTS (SELECT 1 FROM broadcast_recipients r
              WHERE r.broadcast_id = b.id AND r.worker IS NOT NULL AND r.status = 'unknown'
                AND r.reconcile_requeued_at IS NULL
                AND coalesce(r.handed_at, '-infinity') < now() - %(after)s::interval)
ORDER BY b.created_at, b.id

-- reconcile_requeue --
-- Unknown rows with no event after `after`, never requeued, back to pending once (counted
-- only with dry_run) (pgcast_reconcile_requeue_v1).
SELECT * FROM pgcast_reconcile_requeue_v1(%(id)s, %(after)s::interval, %(dry_run)s,
                                          %(details)s::jsonb)

-- reconcile_counts --
-- A broadcast's unknown rows: open, resolved by an event, requeued for want of one.
SELECT id, status, unknown AS open, unknown_resolved AS resolved, unknown_requeued AS requeued
FROM broadcasts WHERE id = %(id)s
