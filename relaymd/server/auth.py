"""Bearer tokens: operator scope, the worker bootstrap token, and per-worker session tokens.

The embedded default generates the operator and worker tokens into a 0600 file under the
orchestrator's home, which the CLI on the same machine reads by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relaymd.config import Settings

Scope = Literal["operator", "bootstrap", "worker"]


class TokenFileError(Exception):
    pass


@dataclass(frozen=True)
class Tokens:
    operator: str
    worker: str


@dataclass(frozen=True)
class Principal:
    scope: Scope
    worker_id: str | None = None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def read_tokens_file(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenFileError(
            f"{path}: token file is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run `chmod 600 {path}`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TokenFileError(f"{path}: cannot read token file: {exc}") from None
    if not isinstance(data, dict):
        raise TokenFileError(f"{path}: token file must hold a JSON object")
    return {k: v for k, v in data.items() if isinstance(v, str)}


def load_or_create_tokens(settings: Settings) -> Tokens:
    """Tokens from settings (config/env) win; otherwise the 0600 file, created on first start."""
    path = settings.tokens_path
    stored = read_tokens_file(path)
    operator = settings.operator_token.get_secret_value() if settings.operator_token else None
    worker = settings.worker_token.get_secret_value() if settings.worker_token else None
    wanted = {
        "operator": operator or stored.get("operator") or new_token(),
        "worker": worker or stored.get("worker") or new_token(),
    }
    if wanted != stored:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(wanted, fh)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return Tokens(operator=wanted["operator"], worker=wanted["worker"])


class Authenticator:
    def __init__(self, tokens: Tokens) -> None:
        self._operator = tokens.operator.encode()
        self._worker = tokens.worker.encode()
        self._sessions: dict[str, str] = {}  # sha256(token) -> worker id

    def set_sessions(self, sessions: dict[str, str]) -> None:
        self._sessions = dict(sessions)

    def add_session(self, token_hash: str, worker_id: str) -> None:
        self._sessions[token_hash] = worker_id

    def drop_worker(self, worker_id: str) -> None:
        for h in [h for h, w in self._sessions.items() if w == worker_id]:
            del self._sessions[h]

    def identify(self, authorization: str | None) -> Principal | None:
        if not authorization or not authorization.startswith("Bearer "):
            return None
        token = authorization[7:].strip()
        raw = token.encode()
        if hmac.compare_digest(raw, self._operator):
            return Principal("operator")
        if hmac.compare_digest(raw, self._worker):
            return Principal("bootstrap")
        worker_id = self._sessions.get(hash_token(token))
        return Principal("worker", worker_id) if worker_id else None
