"""`register`: put the agent's workflows, activities and built-in tools into another registry.

Importing `everruns.agent` already registers everything in `default_registry`; a program (or a
test) that runs a `Worker` on a registry of its own calls `register(registry)` to serve the
agent there too. It only copies definitions; it runs nothing.
"""

from __future__ import annotations

from everruns.agent import tools
from everruns.agent.activities import process_input, reason
from everruns.agent.workflow import agent_session, agent_turn
from everruns.domain.registry import ActivityDefinition, Registry, WorkflowDefinition, definition_of

__all__ = ["register"]

_WORKFLOWS = (agent_session, agent_turn)
_ACTIVITIES = (process_input, reason, tools.calculator, tools.clock, tools.sleep, tools.http_get)


def register(registry: Registry) -> Registry:
    """Register the agent's workflows, activities and built-in tools in ``registry``.

    Registering into a registry that already has them is a no-op.

    Returns:
        ``registry``, for chaining.

    Raises:
        AlreadyExists: ``registry`` has other functions under the agent's names.
    """
    for workflow_fn in _WORKFLOWS:
        workflow_definition = definition_of(workflow_fn)
        assert isinstance(workflow_definition, WorkflowDefinition)
        registry.add_workflow(workflow_fn, name=workflow_definition.name)
    for activity_fn in _ACTIVITIES:
        activity_definition = definition_of(activity_fn)
        assert isinstance(activity_definition, ActivityDefinition)
        registry.add_activity(
            activity_fn, name=activity_definition.name, options=activity_definition.options
        )
    return registry
