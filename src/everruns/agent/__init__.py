"""everruns.agent: an LLM agent whose every turn is a durable workflow.

Importing it registers, in `everruns.default_registry`, the ``agent_session`` and
``agent_turn`` workflows, the ``process_input`` and ``reason`` activities and the built-in
tools (``act.calculator``, ``act.clock``, ``act.sleep``, ``act.http_get``), so
``python -m everruns.worker`` serves it with no arguments. Callers use `send_message`, which
returns a `TurnHandle` to stream the turn's events and await its answer. Only re-exports here.
"""

from everruns.agent.activities import DEFAULT_MAX_STEPS as DEFAULT_MAX_STEPS
from everruns.agent.activities import prepare_turn as prepare_turn
from everruns.agent.activities import process_input as process_input
from everruns.agent.activities import reason as reason
from everruns.agent.events import TurnEvent as TurnEvent
from everruns.agent.events import TurnEventMapper as TurnEventMapper
from everruns.agent.providers import OpenAIProvider as OpenAIProvider
from everruns.agent.providers import Provider as Provider
from everruns.agent.providers import ReasonReply as ReasonReply
from everruns.agent.providers import ReasonRequest as ReasonRequest
from everruns.agent.providers import ScriptedProvider as ScriptedProvider
from everruns.agent.providers import ToolCall as ToolCall
from everruns.agent.providers import register_provider as register_provider
from everruns.agent.registration import register as register
from everruns.agent.session import TurnHandle as TurnHandle
from everruns.agent.session import TurnResult as TurnResult
from everruns.agent.session import close_session as close_session
from everruns.agent.session import get_turn as get_turn
from everruns.agent.session import send_message as send_message
from everruns.agent.tools import ToolSpec as ToolSpec
from everruns.agent.tools import tool as tool
from everruns.agent.workflow import ANSWERED as ANSWERED
from everruns.agent.workflow import SESSION_WORKFLOW as SESSION_WORKFLOW
from everruns.agent.workflow import TURN_LIMIT_REACHED as TURN_LIMIT_REACHED
from everruns.agent.workflow import TURN_WORKFLOW as TURN_WORKFLOW
from everruns.agent.workflow import agent_session as agent_session
from everruns.agent.workflow import agent_turn as agent_turn
from everruns.agent.workflow import session_workflow_id as session_workflow_id
from everruns.agent.workflow import turn_workflow_id as turn_workflow_id
