"""Realistic sample data for the demo and the benchmarks.

Three schemas (sales, inventory, analytics) with mixed types: text that
compresses like real names and addresses, numbers, timestamps, JSON payloads
and random tokens that do not compress, so throughput figures are not
flattered by trivially compressible data. Generated server-side in SQL.
"""

from __future__ import annotations

import psycopg

# rows per MiB of database size (heap plus indexes), measured
ROWS_PER_MB = 11000

SCHEMA = """
CREATE SCHEMA IF NOT EXISTS sales;
CREATE SCHEMA IF NOT EXISTS inventory;
CREATE SCHEMA IF NOT EXISTS analytics;
CREATE TABLE IF NOT EXISTS sales.customers (
    id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL,
    city text, created_at timestamptz NOT NULL);
CREATE TABLE IF NOT EXISTS sales.orders (
    id bigint PRIMARY KEY, customer_id bigint NOT NULL REFERENCES sales.customers(id),
    amount numeric(12,2) NOT NULL, status text NOT NULL, placed_at timestamptz NOT NULL,
    note text);
CREATE TABLE IF NOT EXISTS inventory.items (
    sku text PRIMARY KEY, title text NOT NULL, qty int NOT NULL, price numeric(10,2));
CREATE TABLE IF NOT EXISTS analytics.events (
    id bigint PRIMARY KEY, occurred_at timestamptz NOT NULL, kind text NOT NULL,
    payload jsonb NOT NULL, token text NOT NULL);
"""

FIRST = (
    "ARRAY['Ada','Grace','Linus','Barbara','Ken','Margaret','Dennis','Frances','Edsger','Radia']"
)
LAST = "ARRAY['Lovelace','Hopper','Torvalds','Liskov','Thompson','Hamilton','Ritchie','Allen']"
CITIES = "ARRAY['Berlin','Lagos','Lima','Osaka','Oslo','Pune','Quito','Seoul','Tunis','Perth']"


def load_sample_data(conn: psycopg.Connection, size_mb: int) -> dict[str, int]:
    """Create the schemas and fill them to roughly ``size_mb`` MiB; returns row counts."""
    n = max(1000, size_mb * ROWS_PER_MB // 4)
    customers = max(100, n // 4)
    with conn.cursor() as cur:
        cur.execute(SCHEMA)
        cur.execute(COMPAT)
        cur.execute(
            f"""INSERT INTO sales.customers
            SELECT g, ({FIRST})[1 + g %% 10] || ' ' || ({LAST})[1 + (g / 10) %% 8],
                   'user' || g || '@example.' || (ARRAY['com','org','net'])[1 + g %% 3],
                   ({CITIES})[1 + (g * 7) %% 10],
                   timestamptz '2020-01-01' + (g %% 100000) * interval '17 minutes'
            FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
            (customers,),
        )
        cur.execute(
            """INSERT INTO sales.orders
            SELECT g, 1 + (g * 31) %% %s, round((random() * 1000)::numeric, 2),
                   (ARRAY['new','paid','shipped','returned'])[1 + g %% 4],
                   timestamptz '2021-01-01' + g * interval '41 seconds',
                   CASE WHEN g %% 3 = 0 THEN 'gift wrap, leave at door ' || md5(g::text) END
            FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
            (customers, n),
        )
        cur.execute(
            """INSERT INTO inventory.items
            SELECT 'SKU-' || lpad(g::text, 8, '0'), 'Item ' || g || ' ' || md5((g * 13)::text),
                   (random() * 500)::int, round((random() * 200)::numeric, 2)
            FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
            (max(100, n // 10),),
        )
        cur.execute(
            """INSERT INTO analytics.events
            SELECT g, timestamptz '2024-01-01' + g * interval '3 seconds',
                   (ARRAY['view','click','purchase','signup'])[1 + g %% 4],
                   jsonb_build_object('session', md5(random()::text), 'page', '/p/' || g %% 977,
                                      'ms', (random() * 5000)::int),
                   encode(gen_random_bytes_compat(24), 'base64')
            FROM generate_series(1, %s) g ON CONFLICT DO NOTHING""",
            (n,),
        )
        cur.execute("ANALYZE")
        counts = {}
        for table in ("sales.customers", "sales.orders", "inventory.items", "analytics.events"):
            schema, name = table.split(".")
            row = cur.execute(
                psycopg.sql.SQL("SELECT count(*) FROM {}").format(
                    psycopg.sql.Identifier(schema, name)
                )
            ).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


COMPAT = """
CREATE OR REPLACE FUNCTION gen_random_bytes_compat(n int) RETURNS bytea
LANGUAGE sql VOLATILE AS $$
  SELECT string_agg(decode(lpad(to_hex((random() * 4294967295)::bigint), 8, '0'), 'hex'), ''::bytea)
  FROM generate_series(1, (n + 3) / 4)
$$;
"""
