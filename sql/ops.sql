-- Queries of operations: connection checks, retention, metrics.

-- backend_pid --
-- The process id of the server backend running this statement (a pooler's differs).
SELECT pg_backend_pid()
