"""What the OpenAPI document (/schema/openapi.json) says the protocols answer.

Each protocol has its own error shape, and some answers are JSON or an event
stream depending on the request; Litestar's defaults (its own 400 body, one
media type per answer) would describe neither, so they are declared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from litestar.enums import ParamType
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Operation,
    Parameter,
    Reference,
    RequestBody,
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


# Operation subclasses are dataclasses of their own: only then does their
# __init__ call __post_init__ (Operation's own has none to call).
@dataclass
class JsonOrEventStream(Operation):
    """An operation whose 200 is JSON or, when the request asks for it, an event stream."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = {
                **(ok.content or {}),
                "text/event-stream": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
            }


def with_request(
    body: Schema | None = None,
    *,
    required: bool = False,
    headers: Sequence[Parameter] = (),
    base: type[Operation] = Operation,
) -> type[Operation]:
    """An operation class that declares the JSON body and the headers a handler takes.

    The handlers read and check their bodies themselves, to answer bad input in
    their protocol's error shape, so Litestar cannot see what they accept.
    """

    @dataclass
    class WithRequest(base):  # type: ignore[misc, valid-type]
        def __post_init__(self) -> None:
            inherited = getattr(super(), "__post_init__", None)
            if inherited is not None:  # JsonOrEventStream's
                inherited()
            if body is not None:
                media = {"application/json": OpenAPIMediaType(schema=body)}
                self.request_body = RequestBody(content=media, required=required)
            declared: list[Parameter | Reference] = list(getattr(self, "parameters", None) or [])
            self.parameters = [*declared, *headers]

    return WithRequest


# Producer-Id, -Epoch and -Seq: an idempotent producer's claim, all three or none.
PRODUCER_HEADERS = (
    Parameter(
        name="Producer-Id",
        param_in=ParamType.HEADER,
        schema=Schema(type=OpenAPIType.STRING, min_length=1),
        description="An idempotent producer's name (with Producer-Epoch and Producer-Seq).",
    ),
    *(
        Parameter(
            name=name,
            param_in=ParamType.HEADER,
            schema=Schema(type=OpenAPIType.STRING, pattern="^[0-9]{1,15}$"),
            description=description,
        )
        for name, description in (
            (
                "Producer-Epoch",
                "The producer's epoch: a restarted producer takes a higher one. "
                "A decimal integer up to 2^53 - 1 (the pattern states the 15-digit part).",
            ),
            (
                "Producer-Seq",
                "The write's seq in its epoch, from 0: a retry repeats it. "
                "A decimal integer up to 2^53 - 1 (the pattern states the 15-digit part).",
            ),
        )
    ),
)


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
