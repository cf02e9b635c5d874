"""API settings from the environment, checked once at startup."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.kdf import hkdf

from pgcast.api import errors

MIN_SECRET_BYTES = 32  # HS256 keys shorter than the hash output are guessable offline
DEFAULT_LEEWAY = 10.0  # seconds of clock skew tolerated on exp/nbf/iat
DEFAULT_POOL_SIZE = 10  # connections per API process
DEFAULT_EVENTS_INTERVAL = 0.5  # seconds between two progress reads of one SSE stream
DEFAULT_MAX_STREAMS = 20  # open SSE streams per account in one API process
DEFAULT_LIMIT_CONCURRENCY = 1000  # connections (and requests) uvicorn serves at once
DEFAULT_TIMEOUT_KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection is kept open
MIN_LIMIT_CONCURRENCY = 4  # room for one stream, /healthz and an ordinary request

# Which algorithms each kind of public key may verify; the first is the default.
_ALGORITHMS: dict[type[Any], tuple[str, ...]] = {
    rsa.RSAPublicKey: ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    ed25519.Ed25519PublicKey: ("EdDSA",),
    ed448.Ed448PublicKey: ("EdDSA",),
}
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


@dataclass(frozen=True)
class Settings:
    """Everything the app needs besides the database URL."""

    algorithm: str  # pinned: the token's own `alg` header is never trusted
    key: Any  # the HS256 secret (bytes) or a public key object
    audience: str | None = None
    issuer: str | None = None
    leeway: float = DEFAULT_LEEWAY
    pool_size: int = DEFAULT_POOL_SIZE
    events_interval: float = DEFAULT_EVENTS_INTERVAL
    max_streams: int = DEFAULT_MAX_STREAMS
    limit_concurrency: int = DEFAULT_LIMIT_CONCURRENCY
    timeout_keep_alive: float = DEFAULT_TIMEOUT_KEEP_ALIVE
    cursor_key: bytes = b""  # 32 bytes; derived from the secret, PGCAST_API_CURSOR_SECRET or random

    @property
    def total_streams(self) -> int:
        """SSE streams this process holds at once over every account: half of uvicorn's limit.

        An open stream is a connection and a task to uvicorn, so streams at their cap leave the
        other half of limit_concurrency to /healthz and ordinary requests (never a 503).
        """
        return max(1, self.limit_concurrency // 2)

    @property
    def secret(self) -> bytes | None:
        """The HS256 secret, when the API is configured with one."""
        return self.key if isinstance(self.key, bytes) else None


def _public_key(raw: str) -> Any:
    text = raw if raw.lstrip().startswith("-----BEGIN") else _read(raw)
    try:
        return serialization.load_pem_public_key(text.encode())
    except ValueError as exc:
        raise errors.ConfigError(f"PGCAST_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None


def _read(path: str) -> str:
    try:
        return Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.ConfigError(f"cannot read PGCAST_JWT_PUBLIC_KEY file {path}: {exc}") from None


def _key_algorithms(key: Any) -> tuple[str, ...]:
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _CURVES.get(key.curve.name)
        if alg is None:
            raise errors.ConfigError(f"unsupported EC curve {key.curve.name}")
        return (alg,)
    for kind, algs in _ALGORITHMS.items():
        if isinstance(key, kind):
            return algs
    raise errors.ConfigError(f"unsupported public key type {type(key).__name__}")


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise errors.ConfigError(f"{name} is not a number: {raw!r}") from None
    if value < minimum:
        raise errors.ConfigError(f"{name} must be at least {minimum}")
    return value


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Settings from PGCAST_JWT_* and PGCAST_API_*; raises ConfigError."""
    env = os.environ if env is None else env
    secret = env.get("PGCAST_JWT_SECRET") or None
    public = env.get("PGCAST_JWT_PUBLIC_KEY") or None
    wanted = env.get("PGCAST_JWT_ALGORITHM") or None
    if secret and public:
        raise errors.ConfigError("set PGCAST_JWT_SECRET or PGCAST_JWT_PUBLIC_KEY, not both")
    key: Any
    if secret:
        key = secret.encode()
        if len(key) < MIN_SECRET_BYTES:
            raise errors.ConfigError(
                f"PGCAST_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (got {len(key)})")
        allowed: tuple[str, ...] = ("HS256",)
    elif public:
        key = _public_key(public)
        allowed = _key_algorithms(key)
    else:
        raise errors.ConfigError("set PGCAST_JWT_SECRET (HS256, at least 32 bytes) or "
                                 "PGCAST_JWT_PUBLIC_KEY (RS256, ES256 or EdDSA)")
    algorithm = wanted or allowed[0]
    if algorithm not in allowed:
        raise errors.ConfigError(f"PGCAST_JWT_ALGORITHM {algorithm} does not fit the key "
                                 f"(allowed: {', '.join(allowed)})")
    limit = int(_number(env, "PGCAST_API_LIMIT_CONCURRENCY", DEFAULT_LIMIT_CONCURRENCY,
                        MIN_LIMIT_CONCURRENCY))
    return Settings(
        algorithm=algorithm, key=key,
        audience=env.get("PGCAST_JWT_AUDIENCE") or None,
        issuer=env.get("PGCAST_JWT_ISSUER") or None,
        leeway=_number(env, "PGCAST_JWT_LEEWAY", DEFAULT_LEEWAY, 0),
        pool_size=int(_number(env, "PGCAST_API_POOL_SIZE", DEFAULT_POOL_SIZE, 1)),
        events_interval=_number(env, "PGCAST_API_EVENTS_INTERVAL", DEFAULT_EVENTS_INTERVAL, 0.05),
        max_streams=int(_number(env, "PGCAST_API_MAX_STREAMS", DEFAULT_MAX_STREAMS, 1)),
        limit_concurrency=limit,
        timeout_keep_alive=_number(env, "PGCAST_API_TIMEOUT_KEEP_ALIVE",
                                   DEFAULT_TIMEOUT_KEEP_ALIVE, 1),
        cursor_key=cursor_key(env.get("PGCAST_API_CURSOR_SECRET") or None, secret),
    )


def cursor_key(cursor_secret: str | None, jwt_secret: str | None) -> bytes:
    """The 32-byte key that seals recipient cursors.

    Derived (HKDF-SHA256) from PGCAST_API_CURSOR_SECRET, else from PGCAST_JWT_SECRET, so every
    API process behind one load balancer reads the others' cursors; with a public key and no
    cursor secret, a random key per process (cursors then last as long as the process).
    """
    material = cursor_secret or jwt_secret
    if material is None:
        return os.urandom(32)
    if cursor_secret is not None and len(cursor_secret.encode()) < MIN_SECRET_BYTES:
        raise errors.ConfigError(f"PGCAST_API_CURSOR_SECRET must be at least {MIN_SECRET_BYTES} "
                                 f"bytes (got {len(cursor_secret.encode())})")
    return hkdf.HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"pgcast api cursor v1").derive(material.encode())
