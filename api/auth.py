"""JWT bearer authentication: PyJWT behind Starlette's AuthenticationMiddleware."""

from __future__ import annotations

import logging
import time
from typing import Any

import jwt
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from pgcast.api import config, errors
from pgcast.mail import validate as validate_mail

log = logging.getLogger("pgcast.api")

# "/": the dashboard page, which holds no data; the webhook: SNS signatures
PUBLIC_PATHS = frozenset({"/healthz", "/", "/webhooks/ses"})
# /static/: the dashboard's files; /u/: one-click unsubscribe, /c/ and /o/: clicks and opens
# (the token in the path is the credential); /f/, /p/, /v/, /a/: sign-up forms, preference
# pages, view in browser, archives
PUBLIC_PREFIXES = ("/static/", "/u/", "/c/", "/o/", "/f/", "/p/", "/v/", "/a/")
REQUIRED_CLAIMS = ("exp", "sub", "account")
MAX_ACCOUNT_LENGTH = validate_mail.MAX_ACCOUNT_LENGTH  # characters: one limit everywhere
MAX_SUB_LENGTH = 200  # characters
UNAUTHORIZED = "a valid bearer token is required"  # the only 401 text: reasons go to the log


class Principal(BaseUser):
    """The caller: the token's subject, acting inside the token's account."""

    def __init__(self, account: str, sub: str, expires: float = float("inf")) -> None:
        self.account = account
        self.sub = sub
        self.expires = expires  # the token's exp, seconds since the epoch

    @property
    def is_authenticated(self) -> bool:
        """Always: a Principal only exists for a verified token."""
        return True

    @property
    def display_name(self) -> str:
        """The token's subject."""
        return self.sub


class JWTBackend(AuthenticationBackend):
    """Verifies `Authorization: Bearer <JWT>` with the pinned algorithm and key."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        """A Principal for a valid token; None on public paths; AuthenticationError otherwise."""
        if conn.url.path in PUBLIC_PATHS or conn.url.path.startswith(PUBLIC_PREFIXES):
            return None
        header = conn.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise AuthenticationError("missing bearer token")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError("the Authorization header must be `Bearer <token>`")
        claims = verify(self.settings, token.strip())
        return AuthCredentials(["authenticated"]), Principal(claims["account"], claims["sub"],
                                                             float(claims["exp"]))


def verify(settings: config.Settings, token: str) -> dict[str, Any]:
    """The claims of a valid token; raises AuthenticationError with the reason."""
    s = settings
    try:
        claims: dict[str, Any] = jwt.decode(
            token, s.key, algorithms=[s.algorithm], audience=s.audience, issuer=s.issuer,
            leeway=s.leeway,
            options={"require": list(REQUIRED_CLAIMS), "verify_aud": s.audience is not None,
                     "verify_iss": s.issuer is not None})
    except jwt.PyJWTError as exc:
        raise AuthenticationError(f"invalid token: {exc}") from None
    _claim_text(claims, "account", MAX_ACCOUNT_LENGTH)
    _claim_text(claims, "sub", MAX_SUB_LENGTH)
    return claims


def _claim_text(claims: dict[str, Any], name: str, max_length: int) -> None:
    """A claim we store or query by: a short non-empty string Postgres can hold as text."""
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value) > max_length:
        raise AuthenticationError(f"invalid token: the {name} claim must be a non-empty string "
                                  f"of at most {max_length} characters")
    try:  # a lone surrogate cannot be encoded; NUL cannot be stored in text or jsonb
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise AuthenticationError(f"invalid token: the {name} claim is not valid Unicode") from None
    found = validate_mail.control_character(value)
    if found:
        raise AuthenticationError(f"invalid token: the {name} claim holds {found}")


def on_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    """401 with a generic JSON body and an RFC 6750 challenge; the reason goes to the log."""
    log.info("401 %s %s: %s", conn.scope.get("method", "GET"), conn.url.path, exc)
    return JSONResponse({"error": "unauthorized", "message": UNAUTHORIZED}, status_code=401,
                        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def principal(conn: HTTPConnection) -> Principal:
    """The authenticated caller (the middleware guarantees one on non-public routes)."""
    user = conn.user
    if not isinstance(user, Principal):  # defence in depth: never serve a route unscoped
        raise errors.Unauthorized("missing bearer token")
    return user


def make_token(settings: config.Settings, account: str, sub: str = "dev",
               ttl: float = 3600) -> str:
    """An HS256 token for `account`, signed with the configured secret (dev and demo)."""
    if settings.secret is None:
        raise errors.ConfigError("pgcast token signs with PGCAST_JWT_SECRET; none is set")
    if not account:
        raise errors.ConfigError("the account must be non-empty")
    if ttl <= 0:
        raise errors.ConfigError("the ttl must be positive")
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "account": account, "iat": now, "exp": now + int(ttl)}
    if settings.audience:
        claims["aud"] = settings.audience
    if settings.issuer:
        claims["iss"] = settings.issuer
    return jwt.encode(claims, settings.secret, algorithm="HS256")
