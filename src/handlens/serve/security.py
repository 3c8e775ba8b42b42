"""Request guards that run before any route: body limits, Host and Origin checks, security headers.

* **Body limits**: every body is counted as it arrives (a chunked upload too) and refused with 413 past
  the upload limit; a JSON body has its own, much smaller limit, so that parsing it can never stall the
  event loop (a 17.5 MB body of 1.5M keys held ``/livez`` for 3 s).
* **DNS rebinding** (a web page whose name is re-pointed at 127.0.0.1 talks to a loopback service as its own
  origin): a request's ``Host`` must be an IP literal (rebinding needs a name), a localhost name, this
  machine's name, or an ``--allowed-host``; a mutating request that carries an ``Origin`` must come from
  the service's own origin (or a configured CORS origin).
* **Headers**: ``X-Content-Type-Options: nosniff`` on every response, ``Content-Security-Policy`` on the
  viewer (scripts, styles and connections from this origin only) and ``default-src 'none'`` on served
  image files, so a file that is also HTML can never run as a page of this origin.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

from fastapi.responses import JSONResponse

LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}
VIEWER_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
              "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
FILE_CSP = "default-src 'none'; sandbox"


class _BodyTooLarge(Exception):
    def __init__(self, limit: int, kind: str) -> None:
        super().__init__(limit)
        self.limit, self.kind = limit, kind


def _header(scope: Any, name: bytes) -> str:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return ""


class BodyLimit:
    """ASGI middleware: a body beyond ``limit`` bytes (``json_limit`` for ``application/json``) gets 413,
    whether or not it declared its length; it is counted as it arrives, never read in full first."""

    def __init__(self, app: Any, limit: int, json_limit: int) -> None:
        self.app, self.limit, self.json_limit = app, limit, json_limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_json = "json" in _header(scope, b"content-type").lower()
        limit, kind = (self.json_limit, "JSON body") if is_json else (self.limit, "request body")
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit, kind)(scope, receive, send)
            return
        received, started = 0, False

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise _BodyTooLarge(limit, kind)
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BaseException as exc:  # Starlette's middleware may wrap it in an exception group
            found = exc if isinstance(exc, _BodyTooLarge) else (
                exc.subgroup(_BodyTooLarge) if isinstance(exc, BaseExceptionGroup) else None)
            if found is None:
                raise
            if not started:
                await _too_large(limit, kind)(scope, receive, send)


def _too_large(limit: int, kind: str) -> JSONResponse:
    what = "upload limit" if kind == "request body" else "JSON limit"
    return JSONResponse({"detail": f"the {kind} exceeds the {what} of {limit:,} bytes"}, status_code=413)


def machine_names() -> set[str]:
    """This machine's own names (a service bound to all interfaces is reached by them)."""
    names = set()
    for get in (socket.gethostname, socket.getfqdn):
        try:
            names.add(get().lower())
        except OSError:
            continue
    return names


def host_part(value: str) -> str:
    """``Host``/``Origin`` netloc -> the lower-case host, without port or IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class HostGuard:
    """ASGI middleware refusing requests whose ``Host`` could come from DNS rebinding (400), and mutations whose
    ``Origin`` is another site's (403). ``allowed_hosts``: extra names the service is reached by (``*`` turns
    the Host check off, for a service behind a proxy that checks it); ``cors_origins`` may also mutate."""

    def __init__(self, app: Any, *, allowed_hosts: list[str], cors_origins: list[str]) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.names = LOCAL_NAMES | machine_names() | {h.lower() for h in allowed_hosts if h != "*"}
        self.cors = {o.rstrip("/").lower() for o in cors_origins}

    def host_allowed(self, host: str) -> bool:
        return self.any_host or is_ip_literal(host) or host in self.names

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        host_header = _header(scope, b"host")
        host = host_part(host_header)
        if not self.host_allowed(host):
            response = JSONResponse({"detail": f"Host {host!r} is not a name of this service; a page served from "
                                               "another name cannot reach it (DNS rebinding). Start the service "
                                               "with --allowed-host NAME for the names it is reached by"},
                                    status_code=400)
            await response(scope, receive, send)
            return
        origin = _header(scope, b"origin")
        if scope.get("method") in MUTATING and origin and not self._same_origin(origin, host_header):
            response = JSONResponse({"detail": f"a request from the page at {origin} may not change this "
                                               "workspace: only the service's own pages (or --cors-origin "
                                               "sites) may"}, status_code=403)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _same_origin(self, origin: str, host_header: str) -> bool:
        """Exactly ``scheme://host[:port]`` of this request's Host (no path, no other scheme), or a CORS origin."""
        if origin.rstrip("/").lower() in self.cors:
            return True
        parts = urlsplit(origin)
        return (parts.scheme in ("http", "https") and origin.startswith(f"{parts.scheme}://") and not parts.path
                and not parts.query and not parts.fragment and not parts.username
                and parts.netloc.lower() == host_header.strip().lower())


class SecurityHeaders:
    """ASGI middleware: ``nosniff`` on every response; the viewer's CSP on pages that do not set their own."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                headers.append((b"x-content-type-options", b"nosniff"))
                if not any(k.lower() == b"content-security-policy" for k, _ in headers):
                    headers.append((b"content-security-policy", VIEWER_CSP.encode()))
                headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
