"""Write keys: routes that change the catalogue need `Authorization: Bearer KEY` once a key is set.

The key comes from the environment variable that `serve.write_key_env` names (never from a file in
the artifact, which is meant to be shared). Reads stay open. Without a key the server only listens
on loopback, where whoever can reach it can already read the artifact's folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable

from fastapi import Depends, HTTPException
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from hllm.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def read_write_key(variable: str) -> str | None:
    """The write key in `$variable`, or None when it is unset or empty."""
    return (os.environ.get(variable) or None) if variable else None


def check_host(host: str, variable: str) -> None:
    """Refuse to listen beyond loopback while writes are open to anyone."""
    if host not in LOOPBACK and read_write_key(variable) is None:
        hint = f"set ${variable} (serve.write_key_env) to a secret, or listen on 127.0.0.1"
        raise UserError(f"serving on {host} would let anyone add items; {hint}", where="serve.host")


def write_guard(key: str | None) -> Callable[..., None]:
    """A FastAPI dependency: 401 without a bearer key, 403 with a wrong one; a no-op when `key` is None."""
    bearer = HTTPBearer(auto_error=False, description="The write key (serve.write_key_env).")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if key is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(
                401,
                "this route needs the write key: Authorization: Bearer KEY",
                {"WWW-Authenticate": "Bearer"},
            )
        if not secrets.compare_digest(credentials.credentials.encode(), key.encode()):
            raise HTTPException(403, "wrong write key")

    return require_key
