-- 0027_webhook_batch_record: record many webhook attempts in one statement (issue 30's
-- throughput bar). A worker's deliveries that end while a record is being written are
-- written together by the next one (group commit): each endpoint still has at most one
-- unrecorded delivery (its next POST waits for its record), so order, leases and the crash
-- outcome are those of pgcast_webhook_record_v1, at one statement per batch.

-- record a batch of attempts, one per endpoint, each under the caller's lease on its endpoint.
-- The batch's leased endpoints are locked first, in id order; the successes are delivered and
-- their endpoints' leases extended, set-based; each failure goes through
-- pgcast_webhook_record_v1 (retry with backoff and give the endpoint back, or disable it past
-- p_give_up). Returns one row per delivery recorded: 'delivered', 'retry' or 'disabled'; a
-- delivery without a row was not recorded (the lease was lost: another worker delivers it).
CREATE FUNCTION pgcast_webhook_record_v2(p_endpoints uuid[], p_tokens uuid[],
                                         p_deliveries bigint[], p_ok boolean[],
                                         p_status integer[], p_error text[],
                                         p_latency_ms double precision[], p_response text[],
                                         p_lease interval, p_base interval,
                                         p_give_up interval)
RETURNS TABLE (delivery_id bigint, outcome text)
LANGUAGE plpgsql
-- a batch is a few rows found by primary key: never a plan that scans a table
SET enable_hashjoin = off SET enable_mergejoin = off SET enable_seqscan = off
AS $$
DECLARE
    now_ timestamptz := clock_timestamp();
    held uuid[];
    i integer;
BEGIN
    -- a record lost to a crash only delivers the events again (at least once): no flush
    PERFORM set_config('synchronous_commit', 'off', true);
    held := ARRAY(SELECT e.id
                  FROM unnest(p_endpoints, p_tokens) AS t(endpoint, token)
                  JOIN webhook_endpoints e ON e.id = t.endpoint AND e.lease_token = t.token
                  WHERE e.lease_expires_at > now_
                  ORDER BY e.id
                  FOR NO KEY UPDATE OF e);
    RETURN QUERY
    WITH ok AS (
        SELECT t.endpoint, t.delivery, t.status, t.latency, t.response
        FROM unnest(p_endpoints, p_deliveries, p_ok, p_status, p_latency_ms, p_response)
             AS t(endpoint, delivery, ok, status, latency, response)
        WHERE t.ok AND t.endpoint = ANY (held)
    ), done AS (
        UPDATE webhook_deliveries d
        SET status = 'delivered', attempts = d.attempts + 1, last_attempt_at = now_,
            first_attempt_at = coalesce(d.first_attempt_at, now_),
            last_status = ok.status, last_error = NULL, latency_ms = ok.latency,
            response = left(ok.response, 1024), delivered_at = now_
        FROM ok
        WHERE d.id = ok.delivery AND d.endpoint_id = ok.endpoint AND d.status = 'pending'
        RETURNING d.id, d.endpoint_id
    ), extended AS (
        UPDATE webhook_endpoints e SET lease_expires_at = now_ + p_lease
        WHERE e.id IN (SELECT done.endpoint_id FROM done)
    )
    SELECT done.id, 'delivered'::text FROM done;
    FOR i IN 1 .. coalesce(cardinality(p_ok), 0) LOOP
        IF NOT p_ok[i] AND p_endpoints[i] = ANY (held) THEN
            delivery_id := p_deliveries[i];
            outcome := pgcast_webhook_record_v1(p_endpoints[i], p_tokens[i], p_deliveries[i],
                                                false, p_status[i], p_error[i],
                                                p_latency_ms[i], p_response[i], p_lease,
                                                p_base, p_give_up);
            IF outcome IS NOT NULL THEN
                RETURN NEXT;
            END IF;
        END IF;
    END LOOP;
END
$$;
