"""The internal listener: the routes walletd processes call on each other, and their credential.

One listener per trust zone. Clients (and HAProxy) reach the public app; only walletd
processes reach this one, on its own socket (``--internal-host``/``--internal-port``), and
only with the cluster credential::

    client ── Bearer <client key> ──▶ public port    /api/v1/..., /healthz, /metrics
                                                      (no internal route, in any spelling)
    walletd ── Walletd-Cluster <cluster credential> ──▶ internal port
                                                      POST /internal/v1/legs (http/legs.py)

The internal app registers nothing but the internal routes, and the public app registers
none of them, so no path spelling (percent-encoding, dot segments, case, absolute-form
targets) and no proxy rule can reach a leg through the public port. The credential is a
kind of its own: sent in its own ``Authorization`` scheme, never equal to a client key (cli
refuses such a configuration), compared in constant time on every request. A client's
bearer key, with or without the forwarded marker, is refused here with 401.

    no Authorization, another scheme (a client's Bearer key), another secret
        ──▶ 401 UNAUTHORIZED (problem+json), the handler never runs
"""

from __future__ import annotations

import hmac
import secrets
from typing import Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from walletd.http import legs
from walletd.http.health import close_while_draining
from walletd.http.problems import ProblemError, problems_middleware
from walletd.http.state import STATE_KEY

__all__ = [
    "CLUSTER_AUTH_SCHEME",
    "CREDENTIAL_BYTES_MIN",
    "ClusterCredential",
    "cluster_auth_middleware",
    "create_internal_app",
]

CLUSTER_AUTH_SCHEME: Final = "Walletd-Cluster"
# A generated credential carries 32 random bytes; one given by the operator at least 16.
CREDENTIAL_BYTES_MIN: Final = 16
_GENERATED_PREFIX: Final = "wdc1_"


class ClusterCredential:
    """The secret every walletd process of one cluster shares, and nothing else holds.

    Never printed: ``repr`` and ``str`` hide it, so it cannot leak into a log line.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: str) -> None:
        secret = secret.strip()
        if len(secret.encode("utf-8")) < CREDENTIAL_BYTES_MIN:
            raise ValueError(
                f"the cluster credential must be at least {CREDENTIAL_BYTES_MIN} bytes"
            )
        if not secret.isascii() or not secret.isprintable() or " " in secret:
            raise ValueError("the cluster credential must be printable ASCII without spaces")
        self._secret = secret

    @classmethod
    def generate(cls) -> ClusterCredential:
        return cls(_GENERATED_PREFIX + secrets.token_urlsafe(32))

    @property
    def secret(self) -> str:
        return self._secret

    def authorization(self) -> str:
        """The ``Authorization`` header value a walletd process sends."""
        return f"{CLUSTER_AUTH_SCHEME} {self._secret}"

    def matches(self, presented: bytes) -> bool:
        return hmac.compare_digest(presented, self._secret.encode("ascii"))

    def __repr__(self) -> str:
        return "ClusterCredential(<hidden>)"

    __str__ = __repr__


def _presented(header: str | None) -> bytes | None:
    """The secret under the cluster scheme; None when absent or under another scheme."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != CLUSTER_AUTH_SCHEME.lower() or not token.strip():
        return None
    # compare_digest needs bytes for non-ASCII input; headers may carry any octets.
    return token.strip().encode("utf-8", "surrogateescape")


def cluster_auth_middleware(credential: ClusterCredential) -> Middleware:
    """Refuse every request that does not carry ``credential`` (see the module doc)."""

    @web.middleware
    async def cluster_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        presented = _presented(request.headers.get("Authorization"))
        if presented is None or not credential.matches(presented):
            raise ProblemError(
                401,
                "UNAUTHORIZED",
                f"send Authorization: {CLUSTER_AUTH_SCHEME} <this cluster's credential>; "
                "client API keys are not accepted here",
                headers={"WWW-Authenticate": f'{CLUSTER_AUTH_SCHEME} realm="walletd-internal"'},
            )
        return await handler(request)

    return cluster_auth


def create_internal_app(public: web.Application, credential: ClusterCredential) -> web.Application:
    """The internal app, served on its own socket; it shares the public app's state (the
    engine that app's services start), so it answers only while those services run."""
    state = public[STATE_KEY]
    app = web.Application(
        client_max_size=state.settings.bulk_body_bytes_max,
        middlewares=[problems_middleware, cluster_auth_middleware(credential)],
    )
    app[STATE_KEY] = state
    app.router.add_routes(legs.routes)
    app.on_response_prepare.append(close_while_draining)
    return app
