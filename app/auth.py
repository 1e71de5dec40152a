"""Who may do what: API keys with scopes, per-stream read tokens, one table of routes.

* **API keys** come from STREAMKEEP_API_KEYS (and/or a file, STREAMKEEP_API_KEYS_FILE):
  ``key:scope[,scope...]`` entries separated by ``;`` or new lines, ``#`` starts a
  comment in the file. Scopes are ``read``, ``write`` and ``admin`` (which implies
  the other two). With at least one key configured, every route but the open ones
  (/healthz, the page and CORS preflights) needs ``Authorization: Bearer <key>``.
* **Read tokens** are signed (HMAC-SHA256 with STREAMKEEP_TOKEN_SECRET), name one
  stream and expire; they allow reading that stream and nothing else. A browser's
  EventSource cannot set headers, so they are also taken from ``?token=``. API keys
  are not: a URL ends up in logs and browser histories.

The decision is made in one place, :func:`auth_middleware`, from the route's
template (``scope["path_template"]``), the method and the request's path
parameters and headers, through :data:`ROUTES`. A route the table does not know is
refused to anyone but an admin (and tests/test_auth.py fails for it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from litestar import Litestar, Request
from litestar.enums import ScopeType
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Receive, Scope, Send

from app.config import Settings
from app.errors import Status, StreamError

log = logging.getLogger("streamkeep.auth")

READ_TOKEN_HEADER = "X-Streamkeep-Read-Token"
TOKEN_QUERY = "token"
TOKEN_PREFIX = "skr1."
MIN_KEY_LENGTH = 16
MIN_SECRET_LENGTH = 32
REALM = 'Bearer realm="streamkeep"'


class Access(Enum):
    """What a route needs, weakest first."""

    OPEN = "open"  # anyone (health, the page, CORS preflights)
    ANY_KEY = "any key"  # any valid API key, whatever its scopes (the OpenAPI docs)
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


SCOPES = {"read": Access.READ, "write": Access.WRITE, "admin": Access.ADMIN}


@dataclass(frozen=True, slots=True)
class Need:
    """What one request needs: an access level and, for stream reads, the stream.

    A read token satisfies a READ need of its own stream; `keys_only` refuses
    tokens even then (minting a token must not extend a token's life).
    """

    access: Access
    stream: str | None = None
    keys_only: bool = False


@dataclass(frozen=True, slots=True)
class RequestFacts:
    """What a rule may look at: no body (it is not read before the decision)."""

    method: str
    path_params: Mapping[str, Any]
    headers: Mapping[str, str]  # lower-case names
    query: Mapping[str, str]  # the first value of each parameter


Rule = Callable[[RequestFacts], Need]


def fixed(access: Access) -> Rule:
    need = Need(access)
    return lambda _facts: need


def stream_rule(access: Access, param: str, to_id: Callable[[str], str] = str) -> Rule:
    """A need on the stream named by the path parameter `param` (converted by `to_id`)."""
    return lambda facts: Need(access, to_id(str(facts.path_params[param])))


def genkit_flow(facts: RequestFacts) -> Need:
    """POST /flows/{name}: a streaming request with X-Genkit-Stream-Id reconnects to
    (reads) that run's stream; anything else starts a new run (a write)."""
    # Here, not at the top: the protocol modules import this one (read_token_headers).
    from app.protocols.genkit import STREAM_ID_HEADER, wants_stream

    reconnect_id = facts.headers.get(STREAM_ID_HEADER.lower(), "").strip()
    try:
        streaming = wants_stream(facts.headers.get("accept", ""), facts.query.get("stream"))
    except StreamError:
        streaming = False  # the handler refuses it; until then, it is a write
    if streaming and reconnect_id:
        return Need(Access.READ, reconnect_id)
    return Need(Access.WRITE)


def durable_stream_routes(param: str, to_id: Callable[[str], str] = str) -> dict[str, Rule]:
    """The methods of a Durable Streams stream URL: reads, and writes of any kind."""
    read, write = stream_rule(Access.READ, param, to_id), stream_rule(Access.WRITE, param, to_id)
    return {"GET": read, "HEAD": read, "PUT": write, "POST": write, "DELETE": write}


OPEN, ANY_KEY, ADMIN = fixed(Access.OPEN), fixed(Access.ANY_KEY), fixed(Access.ADMIN)
WRITE = fixed(Access.WRITE)

# Every route, by template (without STREAMKEEP_PATH_PREFIX) and method. OPTIONS is
# open everywhere (CORS preflights carry no credentials) and is not listed.
ROUTES: dict[str, dict[str, Rule]] = {
    # Operators: orchestrators probe /healthz; the rest tells about every stream.
    "/healthz": {"GET": OPEN},
    "/readyz": {"GET": ADMIN},
    "/metrics": {"GET": ADMIN},
    # The page is static HTML and script: it holds no data and asks for a key or a token.
    "/": {"GET": OPEN},
    # Genkit flows (app/protocols/genkit.py).
    "/flows/{name}": {"POST": genkit_flow},
    # Native typed event streams (app/protocols/events.py).
    "/v1/streams": {"GET": ADMIN},
    "/v1/streams/{stream_id}": {
        "GET": stream_rule(Access.READ, "stream_id"),
        "PUT": stream_rule(Access.WRITE, "stream_id"),
    },
    "/v1/streams/{stream_id}/events": {
        "GET": stream_rule(Access.READ, "stream_id"),
        "POST": stream_rule(Access.WRITE, "stream_id"),
    },
    "/v1/streams/{stream_id}/done": {"POST": stream_rule(Access.WRITE, "stream_id")},
    "/v1/streams/{stream_id}/error": {"POST": stream_rule(Access.WRITE, "stream_id")},
    "/v1/streams/{stream_id}/close": {"POST": stream_rule(Access.WRITE, "stream_id")},
    "/v1/streams/{stream_id}/token": {
        "POST": lambda facts: Need(Access.READ, str(facts.path_params["stream_id"]), True)
    },
    # The OpenAI-compatible proxy (app/protocols/openai_proxy.py).
    "/v1/responses": {"POST": WRITE},
    "/v1/chat/completions": {"POST": WRITE},
    "/v1/responses/{response_id}": {"GET": stream_rule(Access.READ, "response_id")},
    "/v1/responses/{response_id}/cancel": {"POST": stream_rule(Access.WRITE, "response_id")},
    # Durable Streams (app/protocols/durable_streams.py): the id is the path after
    # /v1/stream/ (the path parameter keeps its leading slash).
    "/v1/stream/{path}": durable_stream_routes("path", to_id=lambda path: path.lstrip("/")),
}


# Litestar's OpenAPI documents and viewers (/schema, /schema/openapi.json, ...): any key.
OPENAPI_PREFIX = "/schema"


def rule_for(template: str, method: str) -> Rule | None:
    """The rule of a route (template without the path prefix), or None if unclassified."""
    if method == "OPTIONS":
        return OPEN
    if template == OPENAPI_PREFIX or template.startswith(OPENAPI_PREFIX + "/"):
        return ANY_KEY if method in ("GET", "HEAD") else None
    return ROUTES.get(template, {}).get(method)


def unclassified_routes(app: Litestar, path_prefix: str) -> list[str]:
    """Every "METHOD template" of the app that the table does not classify."""
    missing = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            missing.append(f"(not HTTP) {route.path_format}")
            continue
        template = strip_prefix(route.path_format, path_prefix)
        missing.extend(
            f"{method} {template}"
            for method in sorted(route.methods)
            if rule_for(template, method) is None
        )
    return missing


def strip_prefix(template: str, path_prefix: str) -> str:
    prefix = "/" + path_prefix.strip("/") if path_prefix.strip("/") else ""
    if prefix and (template == prefix or template.startswith(prefix + "/")):
        return template[len(prefix) :] or "/"
    return template


# -- keys -------------------------------------------------------------------------------


def parse_keys(text: str, source: str) -> list[tuple[str, frozenset[Access]]]:
    """`key:scope,scope` entries separated by `;` or new lines; `#` comments a line out."""
    keys = []
    lines = (line.split("#", 1)[0] for line in text.splitlines())
    for entry in (part.strip() for line in lines for part in line.split(";")):
        if not entry:
            continue
        key, sep, scopes = entry.rpartition(":")
        if not sep or not key:
            raise ValueError(f"{source}: an entry must look like key:read,write (scopes after ':')")
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            raise ValueError(
                f"{source}: a key must be at least {MIN_KEY_LENGTH} characters without spaces "
                "(e.g. openssl rand -hex 24)"
            )
        names = [s.strip().lower() for s in scopes.split(",") if s.strip()]
        unknown = sorted(set(names) - set(SCOPES))
        if not names or unknown:
            raise ValueError(
                f"{source}: scopes must be among read, write, admin "
                f"(got {', '.join(unknown) if unknown else 'none'})"
            )
        keys.append((key, frozenset(SCOPES[name] for name in names)))
    return keys


def configured_keys(settings: Settings) -> list[tuple[str, frozenset[Access]]]:
    """The keys of STREAMKEEP_API_KEYS and of the file STREAMKEEP_API_KEYS_FILE names."""
    keys = parse_keys(settings.api_keys, "STREAMKEEP_API_KEYS")
    if settings.api_keys_file:
        try:
            text = Path(settings.api_keys_file).read_text()
        except OSError as exc:
            raise ValueError(f"STREAMKEEP_API_KEYS_FILE: cannot read it: {exc}") from None
        keys += parse_keys(text, f"STREAMKEEP_API_KEYS_FILE={settings.api_keys_file}")
    return keys


class KeysFileWatch:
    """Reloads the keys when STREAMKEEP_API_KEYS_FILE changes: keys rotate without
    a restart (a mounted Kubernetes or Docker secret is replaced in place).

    A file that cannot be read or parsed keeps the keys in force, with an error
    in the log: half a rotation must not lock everyone out. So does a file that
    would leave no key at all: a service that checks keys must not start
    serving anyone without one.
    """

    def __init__(self, settings: Settings, authority: Authority) -> None:
        self._settings = settings
        self._authority = authority
        self._path = Path(settings.api_keys_file)
        self._seen = self._signature()

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self._path.stat()  # follows the symlink a Kubernetes secret swaps
        except OSError:
            return None
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def check(self) -> bool:
        """Reload if the file changed since the last check; whether keys were replaced."""
        signature = self._signature()
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            keys = configured_keys(self._settings)
        except ValueError as exc:
            log.error("API keys not reloaded, the keys in force stay: %s", exc)
            return False
        if not keys and self._authority.enforced:
            log.error(
                "API keys not reloaded, the keys in force stay: %s holds no key, and "
                "the service would serve anyone",
                self._path,
            )
            return False
        self._authority.replace_keys(keys)
        log.info("API keys reloaded from %s: %d key(s) in force", self._path, len(keys))
        return True


async def watch_keys_file(watch: KeysFileWatch, every_seconds: float) -> None:
    while True:
        await asyncio.sleep(every_seconds)
        try:
            watch.check()
        except Exception:  # whatever went wrong, keep the keys and keep watching
            log.exception("checking the API keys file failed; the keys in force stay")


def implied(scopes: frozenset[Access]) -> frozenset[Access]:
    if Access.ADMIN in scopes:
        return frozenset({Access.READ, Access.WRITE, Access.ADMIN})
    return scopes


class TokenRejected(Exception):
    """A read token that is malformed, forged or expired: the message says which."""


class Authority:
    """The configured keys and token secret; decides whether a credential meets a need."""

    def __init__(
        self,
        keys: list[tuple[str, frozenset[Access]]],
        token_secret: str,
        token_seconds: int,
    ) -> None:
        self.replace_keys(keys)
        self._secret = token_secret.encode()
        self.token_seconds = token_seconds

    @classmethod
    def from_settings(cls, settings: Settings) -> Authority:
        keys = configured_keys(settings)
        if settings.token_secret and len(settings.token_secret) < MIN_SECRET_LENGTH:
            raise ValueError(
                f"STREAMKEEP_TOKEN_SECRET must be at least {MIN_SECRET_LENGTH} characters "
                "(e.g. openssl rand -hex 32)"
            )
        if settings.read_token_seconds < 1:
            raise ValueError("STREAMKEEP_READ_TOKEN_SECONDS must be at least 1")
        return cls(keys, settings.token_secret, settings.read_token_seconds)

    def replace_keys(self, keys: list[tuple[str, frozenset[Access]]]) -> None:
        """The keys in force (rotated by KeysFileWatch): from the next request on, only
        these are valid. Kept as SHA-256 digests and compared in constant time, all of
        them every time, so neither the comparison nor the loop tells how close a
        guess was."""
        self._keys = [(_digest(key), implied(scopes)) for key, scopes in keys]

    @property
    def enforced(self) -> bool:
        """Whether requests need credentials at all (they do once a key is configured)."""
        return bool(self._keys)

    @property
    def issues_tokens(self) -> bool:
        return bool(self._secret)

    def scopes_of(self, key: str) -> frozenset[Access] | None:
        presented = _digest(key)
        found = None
        for digest, scopes in self._keys:
            if hmac.compare_digest(presented, digest):
                found = scopes
        return found

    def issue(self, stream_id: str, expires_at: int | None = None) -> str:
        """A read token for `stream_id`, valid until `expires_at` (default: the configured life)."""
        if not self._secret:
            raise StreamError(
                Status.FAILED_PRECONDITION, "read tokens are off: set STREAMKEEP_TOKEN_SECRET"
            )
        if expires_at is None:
            expires_at = int(time.time()) + self.token_seconds
        body = f"{TOKEN_PREFIX}{_b64(stream_id.encode())}.{expires_at}"
        return f"{body}.{_b64(self._sign(body))}"

    def stream_of(self, token: str) -> str:
        """The stream a valid token is for; TokenRejected if it is not valid now."""
        if not self._secret:
            raise TokenRejected("read tokens are not enabled on this service")
        body, _, signature = token.rpartition(".")
        # Compared as text: one spelling of a signature only (no padding or other variants).
        if not hmac.compare_digest(signature.encode(), _b64(self._sign(body)).encode()):
            raise TokenRejected("the read token's signature does not match")
        encoded_id, _, expiry = body.removeprefix(TOKEN_PREFIX).partition(".")
        if int(expiry) < time.time():
            # 401, not 403: the credential itself is no longer valid (RFC 6750
            # invalid_token); a new one may well be allowed, unlike another stream.
            raise TokenRejected("the read token has expired")
        return base64.urlsafe_b64decode(encoded_id + "=" * (-len(encoded_id) % 4)).decode()

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).digest()

    def check(self, need: Need, facts: RequestFacts) -> Denied | None:
        """None if the request's credential meets `need`, else why not."""
        if need.access is Access.OPEN or not self.enforced:
            return None
        header = facts.headers.get("authorization")
        if header is not None:
            scheme, _, credential = header.strip().partition(" ")
            credential = credential.strip()
            if scheme.lower() != "bearer" or not credential:
                return unauthenticated("Authorization must be 'Bearer <API key or read token>'")
        elif TOKEN_QUERY in facts.query:
            credential = facts.query[TOKEN_QUERY]
            if not credential.startswith(TOKEN_PREFIX):
                return unauthenticated(
                    "?token= takes read tokens only; send API keys in the Authorization header"
                )
        else:
            wanted = "an API key (Authorization: Bearer <key>)"
            if need.access is Access.READ and need.stream is not None and not need.keys_only:
                wanted += " or a read token for this stream (?token=)"
            return unauthenticated(f"this needs {wanted}")
        if credential.startswith(TOKEN_PREFIX):
            return self._check_token(need, credential)
        scopes = self.scopes_of(credential)
        if scopes is None:
            return unauthenticated("unknown API key", invalid=True)
        if need.access is Access.ANY_KEY or need.access in scopes:
            return None
        held = ", ".join(sorted(s.value for s in scopes))
        return denied(f"this needs the {need.access.value} scope; the key has {held}")

    def _check_token(self, need: Need, token: str) -> Denied | None:
        try:
            stream_id = self.stream_of(token)
        except (TokenRejected, ValueError, UnicodeDecodeError) as exc:
            message = str(exc) if isinstance(exc, TokenRejected) else "the read token is malformed"
            return unauthenticated(message, invalid=True)
        if need.access is not Access.READ or need.stream is None or need.keys_only:
            return denied("a read token only allows reading its own stream; this needs an API key")
        if not hmac.compare_digest(stream_id.encode(), need.stream.encode()):
            return denied("this read token is for another stream")
        return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@dataclass(frozen=True, slots=True)
class Denied:
    status: Status
    message: str
    www_authenticate: str | None = None

    @property
    def http_status(self) -> int:
        return 401 if self.status is Status.UNAUTHENTICATED else 403


def unauthenticated(message: str, *, invalid: bool = False) -> Denied:
    challenge = REALM
    if invalid:
        challenge += f', error="invalid_token", error_description="{message}"'
    return Denied(Status.UNAUTHENTICATED, message, challenge)


def denied(message: str) -> Denied:
    challenge = f'{REALM}, error="insufficient_scope"'
    return Denied(Status.PERMISSION_DENIED, message, challenge)


# -- the middleware ----------------------------------------------------------------------


def facts_of(scope: Scope) -> RequestFacts:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    raw_query = scope.get("query_string", b"").decode("latin-1")
    query = {k: v[0] for k, v in parse_qs(raw_query, keep_blank_values=True).items()}
    return RequestFacts(
        str(scope.get("method", "GET")), scope.get("path_params", {}), headers, query
    )


def auth_middleware(authority: Authority, path_prefix: str) -> Callable[[ASGIApp], ASGIApp]:
    """Refuses, before the handler runs, every request whose credential does not meet
    what the route needs (ROUTES). Litestar runs it once the route is matched."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not authority.enforced:
                await app(scope, receive, send)
                return
            facts = facts_of(scope)
            template = strip_prefix(scope.get("path_template", ""), path_prefix)
            rule = rule_for(template, facts.method)
            # A route nobody classified is for admins only (a test keeps the list empty).
            need = rule(facts) if rule is not None else Need(Access.ADMIN)
            refusal = authority.check(need, facts)
            if refusal is None:
                await app(scope, receive, send)
                return
            await _refuse(refusal, send)

        return handle

    return middleware


async def _refuse(refusal: Denied, send: Send) -> None:
    body = json.dumps({"error": {"status": str(refusal.status), "message": refusal.message}})
    headers = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]
    if refusal.www_authenticate:
        headers.append((b"www-authenticate", refusal.www_authenticate.encode("latin-1")))
    await send({"type": "http.response.start", "status": refusal.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body.encode(), "more_body": False})


def authority_of(request: Request) -> Authority:  # type: ignore[type-arg]
    authority: Authority = request.app.state.authority
    return authority


def read_token_headers(request: Request, stream_id: str) -> dict[str, str]:  # type: ignore[type-arg]
    """The response header that hands the creator of a stream a read token for it
    (none when STREAMKEEP_TOKEN_SECRET is unset)."""
    authority = authority_of(request)
    if not authority.issues_tokens:
        return {}
    return {READ_TOKEN_HEADER: authority.issue(stream_id)}


# -- start-up ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class UnsafeExposure(ValueError):
    """Serving without keys on an address others can reach, without being told to."""


def exposure_notice(settings: Settings, authority: Authority) -> str:
    """The start-up line about access control; UnsafeExposure if it must not start."""
    where = f"{settings.host}:{settings.port}"
    tokens = (
        f"read tokens on ({settings.read_token_seconds} s)"
        if authority.issues_tokens
        else "read tokens off"
    )
    if authority.enforced:
        return f"authentication on: API keys required on {where} (except /healthz), {tokens}"
    if settings.allow_unauthenticated:
        return (
            f"authentication OFF (STREAMKEEP_ALLOW_UNAUTHENTICATED): anyone who reaches "
            f"{where} can read, write and delete every stream"
        )
    if not is_loopback(settings.host):
        raise UnsafeExposure(
            f"refusing to serve on {settings.host} without authentication: set "
            "STREAMKEEP_API_KEYS (see the README's Security section), or pass "
            "--allow-unauthenticated (STREAMKEEP_ALLOW_UNAUTHENTICATED=true) if something "
            "in front of streamkeep already authenticates every request"
        )
    return (
        f"authentication off: no API keys configured, so listening on loopback only ({where}); "
        "set STREAMKEEP_API_KEYS to serve other hosts"
    )
