"""What the OpenAPI document (/schema/openapi.json) says the protocols answer.

Each protocol has its own error shape, and some answers are JSON or an event
stream depending on the request; Litestar's defaults (its own 400 body, one
media type per answer) would describe neither, so they are declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Schema,
    SecurityScheme,
)

from app import __version__


@dataclass
class Error:
    """A failure: a status name (app/errors.py), a message, maybe details."""

    status: str
    message: str
    details: Any | None = None


@dataclass
class ErrorEnvelope:
    """{"error": {...}}: Genkit's shape, and the service's own (401, 403, 404, ...)."""

    error: Error


@dataclass
class OpenAIError:
    message: str
    type: str
    param: str | None
    code: str


@dataclass
class OpenAIErrorEnvelope:
    """The OpenAI-compatible proxy's errors, as OpenAI's SDKs expect them."""

    error: OpenAIError


def errors(container: type, *codes: int) -> dict[int, ResponseSpec]:
    return {
        code: ResponseSpec(container, description="failed", generate_examples=False)
        for code in codes
    }


class JsonOrEventStream(Operation):
    """An operation whose 200 is JSON or, when the request asks for it, an event stream."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {
                **(ok.content or {}),
                "text/event-stream": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
            }


# Security: API keys as bearer tokens; read tokens as bearer tokens or ?token=.
openapi_config = OpenAPIConfig(
    title="streamkeep",
    version=__version__,
    components=Components(
        security_schemes={
            "apiKey": SecurityScheme(type="http", scheme="bearer"),
            "readToken": SecurityScheme(type="apiKey", name="token", security_scheme_in="query"),
        }
    ),
    security=[{"apiKey": []}, {"readToken": []}],
)
