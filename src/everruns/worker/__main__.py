"""`python -m everruns.worker [MODULE ...]`: run a worker for the workflows and activities the
modules register.

Each module is imported so that its ``@everruns.workflow``/``@everruns.activity`` decorators fill
the default registry; with no module, ``everruns.agent`` is served if it is installed. The first
SIGINT/SIGTERM/SIGHUP (a closed terminal) drains the worker gracefully, a second one stops it
at once. Operator mistakes (bad variable, module that does not import, refused registration)
print one line and exit non-zero, never a traceback. Configuration comes only from the
environment; ``DATABASE_URL`` is never read.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys

import trio

from everruns._program import quiet_transport_logs, run_program
from everruns.domain.registry import default_registry
from everruns.errors import ConfigError
from everruns.worker.runtime import Worker

USAGE = """usage: python -m everruns.worker [MODULE ...]

Runs an everruns worker serving the workflows and activities that MODULE(s) register
(default: everruns.agent, when installed). Configuration comes from the environment:
  GRPC_ADDRESS                  control plane address (default 127.0.0.1:9001)
  WORKER_ID                     this worker's name (default: hostname-pid-random)
  MAX_CONCURRENT_TASKS          task slots (default 10)
  EVERRUNS_AUTH_TOKEN           bearer token, if the control plane requires one
  EVERRUNS_WORKER_GRACE_PERIOD  seconds running tasks get on SIGTERM (default 30)
  EVERRUNS_TLS_CA               PEM file of the CA(s) to trust: connect with TLS
  EVERRUNS_TLS                  1: connect with TLS, trusting the system's CAs
The first SIGINT/SIGTERM/SIGHUP drains the worker; a second one stops it at once.
"""

DEFAULT_MODULE = "everruns.agent"

log = logging.getLogger("everruns.worker")


def import_modules(names: list[str]) -> None:
    """Import the modules that register workflows and activities.

    With no names, import ``everruns.agent`` if it exists.

    Raises:
        ConfigError: a module could not be imported; the message is one line.
    """
    if not names:
        try:
            importlib.import_module(DEFAULT_MODULE)
        except ModuleNotFoundError as exc:
            if exc.name != DEFAULT_MODULE:
                raise ConfigError(_import_error(DEFAULT_MODULE, exc)) from exc
        except Exception as exc:
            raise ConfigError(_import_error(DEFAULT_MODULE, exc)) from exc
        return
    for name in names:
        try:
            importlib.import_module(name)
        except SystemExit as exc:  # a module run as a script on import: say so, do not exit 0
            raise ConfigError(
                f"cannot import module {name!r}: it called sys.exit({exc.code!r}) when imported"
            ) from exc
        except Exception as exc:
            raise ConfigError(_import_error(name, exc)) from exc


def _import_error(name: str, exc: BaseException) -> str:
    first_line = (str(exc).splitlines() or [""])[0]
    return f"cannot import module {name!r}: {type(exc).__name__}: {first_line}"


async def _watch_signals(worker: Worker, stop_now: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not worker.draining:
                log.info(
                    "received %s: draining (running tasks get %g s); send it again to stop now",
                    name,
                    worker.config.grace_period,
                )
                worker.shutdown()
            else:
                log.warning("received %s again: stopping now", name)
                stop_now.cancel()
                return


async def _run(worker: Worker) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_signals, worker, nursery.cancel_scope)
        await worker.run()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    flags = [a for a in args if a.startswith("-")]
    if flags:
        print(f"everruns.worker: unknown option {flags[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    quiet_transport_logs()
    try:
        worker = Worker.from_env(default_registry)
        import_modules(args)
    except ConfigError as exc:
        print(f"everruns.worker: {exc}", file=sys.stderr)
        return 2
    config = worker.config
    workflows = len(default_registry.workflow_types())
    activities = len(default_registry.activity_types())
    print(
        f"everruns worker {config.worker_id} serving {workflows} workflow types and "
        f"{activities} activity types on {config.address}",
        flush=True,
    )
    return run_program("everruns.worker", _run, worker)


if __name__ == "__main__":
    sys.exit(main())
