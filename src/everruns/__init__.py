"""everruns: durable execution for Python on Trio's structured concurrency.

Workflow authors use `workflow`, `activity`, `WorkflowContext`, `ActivityContext` and
`RetryPolicy`; callers use `Client`; operators run `Worker` and `serve`. Only re-exports here.
"""

from everruns.client import Client as Client
from everruns.client import WorkflowHandle as WorkflowHandle
from everruns.domain.context import WorkflowContext as WorkflowContext
from everruns.domain.registry import Registry as Registry
from everruns.domain.registry import activity as activity
from everruns.domain.registry import default_registry as default_registry
from everruns.domain.registry import workflow as workflow
from everruns.domain.retry import RetryPolicy as RetryPolicy
from everruns.errors import ActivityCancelled as ActivityCancelled
from everruns.errors import ActivityError as ActivityError
from everruns.errors import ChildWorkflowError as ChildWorkflowError
from everruns.errors import ContinueAsNew as ContinueAsNew
from everruns.errors import EverrunsError as EverrunsError
from everruns.errors import NonRetryableError as NonRetryableError
from everruns.errors import RetryAfter as RetryAfter
from everruns.errors import WorkflowCancelled as WorkflowCancelled
from everruns.errors import WorkflowFailed as WorkflowFailed
from everruns.server import ServerConfig as ServerConfig
from everruns.server import serve as serve
from everruns.worker import ActivityContext as ActivityContext
from everruns.worker import Worker as Worker

__version__ = "0.1.0"
