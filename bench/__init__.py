"""The everruns benchmark suite: everruns against PgQueuer, Procrastinate, DBOS and a raw floor.

`python -m bench.run` (normally through `scripts/bench`) runs the workloads of issue 6 and writes
`bench/results/latest.{json,md}`. Nothing here is imported by everruns itself, and nothing here
may change how a system under test is configured beyond what its own defaults say.
"""
