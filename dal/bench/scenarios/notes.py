"""The notes of a report: how each selected kind of scenario was run, in words.

They go into the JSON's ``notes`` and under the tables, so that a number can
be read without the source: pool sizes, what each baseline does, what the
ratios divide. Only the notes of the selected kinds of scenario are given.
"""

from __future__ import annotations

from collections.abc import Sequence

from dal.bench.harness import Timing
from dal.bench.scenarios.catalog import SCENARIOS, TABLE_SHARDS, SuiteOptions


def notes_for(t: Timing, o: SuiteOptions, names: Sequence[str]) -> list[str]:
    """The notes for a run of the scenarios ``names`` with timing ``t`` and options ``o``."""
    cache_notes = [
        "cache scenarios: layers with cache on the same PostgreSQL table, Redis L2 in a namespace of their "
        "own (deleted at the end), l1_ttl = l2_ttl = 3600 s so nothing expires during the run; "
        "counters = changes of dal's cache counters over the scenario, warm-up included",
        "get.l1_hit: every key in L1 before the first op; cachetools.tlru.getitem is a bare "
        "TLRUCache.__getitem__ (same maxsize, same entries, int keys) called without await in the same "
        "loop as dal's awaited repo.get; vs_net takes the loop's own time per op (loop_overhead_ns: the "
        "same loop calling the builtin id) off both sides, and the targets are judged on vs_net",
        "get.l2_hit: l1_max_size=1 and the distinct keys in a shuffled cycle, so every read misses L1 and "
        "is answered by one Redis GET of the row (validated, then filled into L1); redis.get: await "
        "client.get(k) of the same Redis key (same bytes) + dal's msgpack decode, redis-py default client "
        "(socket_timeout 5 s, which wraps each send in asyncio.wait_for; dal's client has none and bounds "
        "each call with asyncio.timeout instead)",
        f"stampede: {SCENARIOS['stampede'].concurrency} concurrent repo.get of one key made cold "
        f"(untimed) before each of {t.rounds} bursts (+1 warm-up); db_queries = the worst burst's "
        "statements (node counters); latencies run from the burst's start",
    ]
    cached = any(SCENARIOS[n].cache for n in names)
    batch_notes = [
        f"batch scenarios: ops are rows; each load writes {o.bulk_rows:,} rows"
        f"{' (--quick: fewer rows than the 100,000 of a full run)' if o.bulk_rows < 100_000 else ''} "
        f"into empty tables (TRUNCATE untimed before each load) of 2 shard databases of their own "
        f"({o.bulk_databases}_0, {o.bulk_databases}_1; dropped at the end) x 8 physical tables; one warm-up "
        f"load per contender, then {t.rounds} rounds of one load each, alternating; ratio = dal's time per "
        "row / the baseline's; p50/p99 = latency of one call (rows_per_call rows)",
        "pg.insert_many / pg.upsert_many / mysql.insert_many: batch_size = the largest physical table's share "
        "(one batch per physical table); pg.insert_many:b1000 uses batch_size=1000 (small batches, one transaction each)",
        f"asyncpg.copy: one copy_records_to_table of the same rows (tuples) into one table; "
        f"asyncpg.row_autocommit: await conn.execute(INSERT) per row on one connection (autocommit), the "
        f"first {o.bulk_sample:,} rows; aiomysql.executemany: executemany of 1,000-row chunks (rewritten "
        "into one multi-row INSERT each) on one autocommit connection",
        f"batchwriter.insert:c1000: 1,000 tasks, each awaiting one single-row write after another for "
        f"{t.round_seconds:g} s per round, writer defaults; repo.insert:c1000 the same with repo.insert, "
        f"pool max_size={o.pool_size} per shard database; ops_per_s = rows/s",
    ]
    read_notes = [
        f"{o.rows} rows in {o.table} over {TABLE_SHARDS} physical tables; keys: seeded random ids "
        f"(seed {o.seed}) of the rows in {o.physical_table}, which the baselines query directly",
        f"pools: dal max_size={o.pool_size}; asyncpg.create_pool() defaults (min 10, max 10); "
        f"SQLAlchemy pool_size={o.pool_size}, max_overflow=0; aiomysql.create_pool() defaults "
        "(min 1, max 10) with autocommit=True",
        "asyncpg.pool.fetchrow: asyncpg's pool runs its reset query on every release (its default): "
        "two round trips per op",
        "asyncpg.conn.fetchrow at c32: 32 tasks share one connection through an asyncio.Lock",
        "sqlalchemy.orm.get: a new AsyncSession per op (async with sessions() as s: await s.get(User, key)); "
        "it runs BEGIN, the SELECT and ROLLBACK",
    ]
    batched = any(SCENARIOS[n].batch for n in names)
    reads = any(not SCENARIOS[n].batch for n in names)
    return [
        "ratio = dal's wall time per operation / the baseline's, median over paired rounds; < 1 means dal is faster",
        f"each contender: {t.warmup_ops} warm-up ops, then {t.rounds} rounds x {t.round_seconds:g} s, "
        "rounds alternating A B C / C B A",
        "ops_per_s = median over rounds of ops / wall time; p50/p99 over every op's latency; "
        "cpu µs = this process's CPU time (user + system) per op, the client side only",
        *(read_notes if reads else []),
        "targets apply to the single-task scenarios, stampede and the batch scenarios; the bench never fails on them",
        *(cache_notes if cached else []),
        *(batch_notes if batched else []),
    ]
