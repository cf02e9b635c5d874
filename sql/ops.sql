-- Queries of operations: connection checks, retention, metrics.

-- backend_pid --
-- The process id of the server backend running this statement (a pooler's differs).
SELECT pg_backend_pid()

-- retention_candidates --
-- Finished, fully counted, not yet archived broadcasts with a partition, finished more than
-- `older_than` seconds ago, oldest first (`pgcast retention`).
SELECT b.id, b.account, b.status, b.total, b.finished_at
FROM broadcasts b
WHERE b.status IN ('sent', 'failed', 'cancelled') AND b.archived_at IS NULL
  AND b.finished_at < now() - make_interval(secs => %(older_than)s)
  AND b.total = b.sent + b.failed + b.skipped + b.unknown + b.cancelled
  AND to_regclass(pgcast_partition_name_v1(b.id)) IS NOT NULL
ORDER BY b.finished_at, b.id

-- retention_partition --
-- One broadcast's partition: its schema and name, and whether it is attached or half-detached.
SELECT n.nspname AS schema, c.relname AS name, i.inhrelid IS NOT NULL AS attached,
       coalesce(i.inhdetachpending, false) AS detach_pending
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
WHERE c.oid = to_regclass(pgcast_partition_name_v1(%(id)s))

-- retention_detach --
-- Detach one partition without blocking the workers (two transactions; not in a block).
ALTER TABLE broadcast_recipients DETACH PARTITION {partition} CONCURRENTLY

-- retention_detach_finalize --
-- Finish a DETACH ... CONCURRENTLY that was interrupted.
ALTER TABLE broadcast_recipients DETACH PARTITION {partition} FINALIZE

-- retention_archive_begin --
-- Mark a finished broadcast for the archive under its row lock, before the detach (a retry
-- then refuses it): true when it is (pgcast_archive_begin_v1).
SELECT pgcast_archive_begin_v1(%(id)s) AS begun

-- retention_archive --
-- Copy a detached partition into the archive, mark the broadcast archived, drop the partition.
SELECT pgcast_archive_v1(%(id)s) AS archived

-- recipient_lookup --
-- Was this address a recipient of broadcast `id`: its status, when, which provider message id
-- (live rows through the contact's key, archived rows through the archive's address index).
SELECT r.broadcast_id, r.email, r.status, r.sent_at, r.provider_message_id, false AS archived
FROM broadcast_recipients r
WHERE r.broadcast_id = %(id)s AND r.contact_id IN (
    SELECT c.id FROM contacts c JOIN broadcasts b ON b.account = c.account
    WHERE b.id = %(id)s AND lower(c.email) = lower(%(email)s))
UNION ALL
SELECT a.broadcast_id, a.email, a.status, a.sent_at, a.provider_message_id, true
FROM broadcast_recipients_archive a
WHERE a.broadcast_id = %(id)s AND lower(a.email) = lower(%(email)s)

-- metrics_queue --
-- The queue as Postgres sees it: recipients not terminal yet (the counters of sending and
-- paused broadcasts), rows in workers' hands (the in-flight indexes), broadcasts by status.
SELECT
    (SELECT coalesce(sum(b.total - b.sent - b.failed - b.skipped - b.unknown - b.cancelled), 0)
     FROM broadcasts b WHERE b.status IN ('sending', 'paused')) AS pending,
    (SELECT count(*) FROM broadcast_recipients r
     WHERE r.worker IS NOT NULL AND r.status = 'claimed') AS claimed,
    (SELECT count(*) FROM broadcast_recipients r
     WHERE r.worker IS NOT NULL AND r.status = 'sending') AS sending,
    (SELECT count(*) FROM broadcasts b WHERE b.status = 'sending') AS broadcasts_sending,
    (SELECT count(*) FROM broadcasts b WHERE b.status = 'paused') AS broadcasts_paused
