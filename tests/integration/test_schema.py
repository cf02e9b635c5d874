"""Migrations: they add up to the declared schema, and migrate is idempotent and race-safe."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import psycopg

from pgcast import schema
from pgcast.sql import migrate
from tests import support

DESCRIBE = """
SELECT 'column' AS kind, table_name || '.' || column_name AS name,
       data_type || coalesce(' default ' || column_default, '') || ' null=' || is_nullable AS def
FROM information_schema.columns WHERE table_schema = 'public'
UNION ALL
SELECT 'index', indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', conrelid::regclass || '.' || conname, pg_get_constraintdef(oid)
FROM pg_constraint WHERE connamespace = 'public'::regnamespace
UNION ALL
SELECT 'view', viewname, definition FROM pg_views WHERE schemaname = 'public'
UNION ALL
SELECT 'function', p.oid::regprocedure::text, pg_get_functiondef(p.oid)
FROM pg_proc p WHERE p.pronamespace = 'public'::regnamespace
UNION ALL
SELECT 'trigger', tgrelid::regclass || '.' || tgname, pg_get_triggerdef(oid)
FROM pg_trigger WHERE NOT tgisinternal
ORDER BY 1, 2
"""


def describe(url: str) -> list[tuple[Any, ...]]:
    """pgcast's objects (not procrastinate's, not the migrations bookkeeping)."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(DESCRIBE).fetchall()  # type: ignore[arg-type]
    return [r for r in rows if "procrastinate" not in r[1] and "schema_migrations" not in r[1]]


def test_migrations_add_up_to_the_declared_schema(pg_server: str) -> None:
    with support.fresh_database(pg_server, "template0") as migrated, \
            support.fresh_database(pg_server, "template0") as declared:
        with psycopg.connect(migrated) as conn:
            migrate.migrate(conn)
        with psycopg.connect(declared) as conn:
            conn.execute(schema.current())  # type: ignore[arg-type]
        got, want = describe(migrated), describe(declared)
        assert len(want) > 20
        assert got == want


def test_migrate_is_idempotent(db_url: str) -> None:
    with psycopg.connect(db_url) as conn:
        assert migrate.migrate(conn) == []
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in schema.migrations()]


def test_two_migrates_at_once_are_safe(pg_server: str) -> None:
    with support.fresh_database(pg_server, "template0") as url:
        env = support.pgcast_env(url)
        runs = [subprocess.Popen([sys.executable, "-m", "pgcast.bin.cli", "migrate"],
                                 cwd=support.ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
        outputs = [p.communicate(timeout=120) for p in runs]
        assert [p.returncode for p in runs] == [0, 0, 0], outputs
        applied = [out for out, _ in outputs if out.startswith("applied")]
        assert len(applied) == 1, outputs  # exactly one did the work, the others waited
        with psycopg.connect(url) as conn:
            n = conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        assert n is not None and n[0] == len(schema.migrations())


def test_upgrade_from_0001_moves_each_broadcasts_rows_into_its_own_keyed_partition(
        pg_server: str) -> None:
    first, *later = schema.migrations()
    assert first.version == 1 and later, "this test upgrades from 0001"
    with support.fresh_database(pg_server, "template0") as url, psycopg.connect(url) as conn:
        conn.execute(first.sql)  # type: ignore[arg-type]
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text "
                     "NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, %s)",
                     (first.name,))
        conn.execute("INSERT INTO contacts (account, email) SELECT 'a', 'u' || g || '@x.test' "
                     "FROM generate_series(1, 30) g")
        def draft(tag: str | None = None) -> Any:
            row = conn.execute("INSERT INTO broadcasts (account, subject, from_address, "
                               "text_body, segment_tag) VALUES ('a', 's', 'f@x.test', 't', %s) "
                               "RETURNING id", (tag,)).fetchone()
            assert row is not None
            return row[0]

        ids = [draft(), draft()]
        for bid in ids:
            assert conn.execute("SELECT queued FROM pgcast_send_v1('a', %s)",
                                (bid,)).fetchone() == (30,)
        # also: a draft, a broadcast nobody matched, a paused one whose claims went back
        still_draft, nobody = draft(), draft("no-such-tag")
        assert conn.execute("SELECT status FROM pgcast_send_v1('a', %s)",
                            (nobody,)).fetchone() == ("sent",)
        conn.execute("SELECT * FROM pgcast_claim_v1(%s, 5, gen_random_uuid(), 'w', "
                     "interval '30 seconds', 0)", (ids[1],))
        assert conn.execute("SELECT ok FROM pgcast_pause_v1('a', %s, 'operator', '{}')",
                            (ids[1],)).fetchone() == (True,)
        # some progress on the first broadcast, which must survive the move
        conn.execute("UPDATE broadcast_recipients SET status = 'sent', sent_at = now(), "
                     "worker = 'w', "
                     "provider_message_id = 'm' || contact_id "
                     "WHERE broadcast_id = %s AND contact_id <= 10", (ids[0],))
        cur = conn.execute("SELECT * FROM broadcast_recipients ORDER BY 1, 2")
        before = cur.fetchall()
        columns = ", ".join(c.name for c in cur.description or [])
        conn.commit()

        migrate.migrate(conn)

        # the columns 0001 had keep their values (later migrations add columns)
        after = conn.execute(f"SELECT {columns} FROM broadcast_recipients "  # type: ignore[arg-type]
                             "ORDER BY 1, 2").fetchall()
        assert after == before
        parts = conn.execute(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'broadcast_recipients'::regclass ORDER BY 1").fetchall()
        assert sorted(parts) == sorted(
            (f"broadcast_recipients_{bid.hex}", f"FOR VALUES IN ('{bid}')") for bid in ids)
        # every index of the parent exists on each partition, named as a new partition's
        # would be, and each has its own key
        for bid in ids:
            part = f"broadcast_recipients_{bid.hex}"
            names = conn.execute("SELECT array_agg(i ORDER BY i) FROM (SELECT indexrelid::"
                                 "regclass::text AS i FROM pg_index WHERE indrelid = "
                                 "%s::regclass) x", (part,)).fetchone()
            assert names == ([f"{part}_{s}" for s in ("in_flight", "pkey", "problems",
                                                      "requeued")],)
            indexes = conn.execute(
                "SELECT count(*) FILTER (WHERE inhparent IS NOT NULL), "
                "       array_agg(pg_get_indexdef(x.indexrelid)) FILTER (WHERE x.indisprimary) "
                "FROM pg_index x LEFT JOIN pg_inherits h ON h.inhrelid = x.indexrelid "
                "WHERE x.indrelid = %s::regclass", (part,)).fetchone()
            assert indexes == (3, [f"CREATE UNIQUE INDEX {part}_pkey ON public.{part} "
                                   "USING btree (contact_id)"])
        assert conn.execute("SELECT to_regclass('broadcast_recipients_0001')").fetchone() == (None,)
        # and the engine's functions work on the moved rows
        claimed = conn.execute("SELECT count(*) FROM pgcast_claim_v3(%s, 100, gen_random_uuid(),"
                               " 'w', interval '30 seconds', 0)", (ids[0],)).fetchone()
        assert claimed == (20,)
        assert conn.execute("SELECT ok FROM pgcast_resume_v1('a', %s, '{}')",
                            (ids[1],)).fetchone() == (True,)
        # the 5 claims the pause put back are requeued (claimed first), the 25 others fresh
        assert conn.execute("SELECT array_agg(contact_id ORDER BY contact_id) FILTER "
                            "(WHERE worker IS NOT NULL) FROM broadcast_recipients "
                            "WHERE broadcast_id = %s AND status = 'pending'",
                            (ids[1],)).fetchone() == (list(range(1, 6)),)
        handed = conn.execute("SELECT contact_id, last_fresh FROM pgcast_claim_handoff_v4(%s, 10, "
                              "gen_random_uuid(), 'w', interval '30 seconds', 0)",
                              (ids[1],)).fetchall()
        assert sorted(handed) == [(i, 10) for i in range(1, 11)]
        # the draft can still be sent, into a partition of its own
        assert conn.execute("SELECT queued FROM pgcast_send_v6('a', %s)",
                            (still_draft,)).fetchone() == (30,)
        assert conn.execute("SELECT count(*) FROM broadcast_recipients WHERE broadcast_id = %s",
                            (nobody,)).fetchone() == (0,)
