"""One runner per system under test; each runs as its own process (`python -m bench.systems.X`).

A runner takes the `bench.common.RunnerArgs` command line, does one run of one workload against
a fresh database, writes a `bench.common.RunResult` as JSON and exits. It starts the system's
own processes (servers, workers) as its children and kills them before it returns.
"""
