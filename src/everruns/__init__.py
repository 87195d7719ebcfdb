"""everruns: durable execution for Python on Trio's structured concurrency."""

from everruns.errors import EverrunsError as EverrunsError

__version__ = "0.1.0"
