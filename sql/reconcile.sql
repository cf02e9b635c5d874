-- Queries of the reconciliation of `unknown` recipients (issue 25).

-- reconcile_candidates --
-- Broadcasts (of one, or all) that hold unknown rows a requeue may concern, oldest first.
SELECT id FROM broadcasts
WHERE unknown > 0 AND status IN ('sending', 'paused', 'sent', 'failed')
  AND (%(id)s::uuid IS NULL OR id = %(id)s::uuid)
ORDER BY created_at, id

-- reconcile_requeue --
-- Unknown rows with no event after `after`, never requeued, back to pending once (counted
-- only with dry_run) (pgcast_reconcile_requeue_v1).
SELECT * FROM pgcast_reconcile_requeue_v1(%(id)s, %(after)s::interval, %(dry_run)s,
                                          %(details)s::jsonb)

-- reconcile_counts --
-- A broadcast's unknown rows: open, resolved by an event, requeued for want of one.
SELECT id, status, unknown AS open, unknown_resolved AS resolved, unknown_requeued AS requeued
FROM broadcasts WHERE id = %(id)s
