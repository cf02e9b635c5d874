-- 0035_erased_cached_plan: pgcast_erased_v1 keeps its plan.
-- A sign-up asks it four times (the sign-up, the message's address and reply-to, the message's
-- handoff), and as a SQL function whose body holds a subquery it is never inlined: Postgres
-- parsed and planned its body again in every statement that called it, some 0.1 ms a call on
-- a busy server, the largest single cost of a sign-up in bench.signup. In plpgsql its plan is
-- kept for the session; pinned generic, because a caller's plan_cache_mode reaches the
-- functions it calls (pgcast_message_handoff_v2 forces custom plans, for which this body
-- would be planned again for every message). Same arguments, same answer (a NULL address is
-- erased nowhere), so callers of every version keep calling it: this replaces the body in
-- place, the one time a shipped function is edited, because the alternative was a new version
-- of each of its six callers for no change of meaning.
CREATE OR REPLACE FUNCTION pgcast_erased_v1(p_account text, p_address text)
RETURNS boolean LANGUAGE plpgsql STABLE
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    RETURN EXISTS (SELECT 1 FROM contact_erasures e, erasure_keys k
                   WHERE e.account = p_account
                     AND e.email_hash = sha256(k.k2 || sha256(k.k1 || sha256(
                         convert_to(lower(btrim(p_address)), 'UTF8')))));
END
$$;
