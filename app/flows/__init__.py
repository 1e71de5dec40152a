"""Flows: async Python functions that stream chunks and return an output.

A flow has Genkit's `sendChunk` shape::

    from app.flows import flow

    @flow
    async def summarize(data, send_chunk):
        for part in ...:
            send_chunk(part)          # does not block; committed in order, in group commits
        return {"summary": ...}       # the result

Raise `app.errors.StreamError` to fail with a status and a message that
clients may see; any other exception is reported to clients as INTERNAL
"internal error" (and logged), so that internals do not leak.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, overload

SendChunk = Callable[[Any], Awaitable[None]]
FlowFunction = Callable[[Any, SendChunk], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Flow:
    name: str
    function: FlowFunction


class FlowRegistry:
    def __init__(self) -> None:
        self._flows: dict[str, Flow] = {}

    def register(self, function: FlowFunction, name: str | None = None) -> Flow:
        flow_name = name or getattr(function, "__name__", "")
        if not flow_name or "/" in flow_name:
            raise ValueError(f"invalid flow name {flow_name!r}")
        if flow_name in self._flows and self._flows[flow_name].function is not function:
            raise ValueError(f"a different flow is already registered as {flow_name!r}")
        registered = Flow(flow_name, function)
        self._flows[flow_name] = registered
        return registered

    def get(self, name: str) -> Flow | None:
        return self._flows.get(name)

    def names(self) -> list[str]:
        return sorted(self._flows)


registry = FlowRegistry()


@overload
def flow(function: FlowFunction, /) -> FlowFunction: ...


@overload
def flow(*, name: str) -> Callable[[FlowFunction], FlowFunction]: ...


def flow(
    function: FlowFunction | None = None, /, *, name: str | None = None
) -> FlowFunction | Callable[[FlowFunction], FlowFunction]:
    """Register a flow in the default registry: `@flow` or `@flow(name="x")`."""

    def decorate(fn: FlowFunction) -> FlowFunction:
        registry.register(fn, name)
        return fn

    return decorate(function) if function is not None else decorate


def load_flow_modules(modules: Iterable[str]) -> None:
    """Import the user's flow modules (STREAMKEEP_FLOWS); their @flow decorators register them."""
    for module in modules:
        if module.strip():
            importlib.import_module(module.strip())
