"""Errors a user can act on.

Every failure that reaches a user (CLI, API, Home Assistant) is one of these, with a message that
names the thing at fault and what would work instead, so no caller has to decode a traceback.
"""

from __future__ import annotations


class PrimaError(Exception):
    """Base of every error the node reports to its user."""


class ModelLoadError(PrimaError):
    """A model file cannot be used: unreadable, truncated, or of an unsupported kind.

    Raised before any state is kept, so a failed load leaves nothing half-open behind.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ContextOverflowError(PrimaError):
    """More positions were asked of a KV cache than it was sized for."""


class ChatTemplateError(PrimaError):
    """A chat template refused the conversation (its ``raise_exception``) or failed to render.

    The message carries the template's own words, e.g. "Conversation roles must alternate", which
    is what a client needs to fix its request.
    """


class SchemaError(PrimaError):
    """A JSON schema (or grammar) for constrained output cannot be compiled."""


class SessionBusyError(PrimaError):
    """A session's KV cache is in use by a generation that has not finished.

    Two generations interleaving on one cache would each corrupt what the other attends to, so
    the second is refused instead; use another session, or wait.
    """


class ClusterError(PrimaError):
    """The ring could not finish the work: a node failed, hung or went away. The head leaves
    it out of the next plan, so the same request can be tried again."""


class NodeUnreachableError(ClusterError):
    """A node the plan needs could not be reached or did not answer in time (it may be busy,
    restarting or refusing connections for a moment): the same request may succeed shortly."""
