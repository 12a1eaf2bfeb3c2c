"""Bearer tokens: operator scope, one bootstrap token per cluster, and per-worker session tokens.

The embedded default generates the operator token and every cluster's bootstrap token into a
0600 file under the orchestrator's home, which the CLI on the same machine reads by itself. The
local cluster's token keeps its historical key, "worker"; other clusters' tokens sit under
"clusters". A bootstrap token is a cluster's identity: a worker registering with it belongs to
that cluster whatever its request body says, so a Salad node holding Salad's token cannot pose as
the HPC cluster.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from relaymd.config import LOCAL_CLUSTER, OrchestratorSettings
from relaymd.fsutil import private_dir

Scope = Literal["operator", "bootstrap", "worker"]


class TokenFileError(Exception):
    pass


@dataclass
class Tokens:
    operator: str
    worker: str  # the local cluster's bootstrap token
    clusters: dict[str, str] = field(default_factory=dict)  # other clusters' bootstrap tokens
    local: str = "local"  # the name of the cluster `worker` belongs to

    def for_cluster(self, name: str) -> str | None:
        return self.worker if name == self.local else self.clusters.get(name)

    def bootstrap(self) -> dict[str, str]:
        """cluster name -> its bootstrap token, the local one included."""
        return {self.local: self.worker, **{n: t for n, t in self.clusters.items()
                                            if n != self.local}}


@dataclass(frozen=True)
class Principal:
    scope: Scope
    worker_id: str | None = None
    cluster: str | None = None  # bootstrap scope: the cluster whose token was shown


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def mask(token: str) -> str:
    return token[:4] + "…" + token[-2:] if len(token) > 12 else "****"


def read_tokens_file(path: Path) -> dict[str, Any]:
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
    out: dict[str, Any] = {k: v for k, v in data.items() if isinstance(v, str)}
    clusters = data.get("clusters")
    if isinstance(clusters, dict):
        out["clusters"] = {k: v for k, v in clusters.items()
                           if isinstance(k, str) and isinstance(v, str) and v}
    return out


def write_tokens_file(path: Path, tokens: Tokens) -> None:
    """Atomically, 0600 from the first byte (never a moment readable by others)."""
    private_dir(path.parent, fix_existing=False)  # a new parent is 0700 whatever the umask
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"operator": tokens.operator, "worker": tokens.worker,
                   "clusters": dict(sorted(tokens.clusters.items()))}, fh)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def load_or_create_tokens(settings: OrchestratorSettings, clusters: list[str] | None = None) -> Tokens:
    """Tokens from settings (config/env) win; otherwise the 0600 file, created on first start.
    Every cluster in `clusters` (default: the configured ones) gets a bootstrap token of its
    own; tokens of clusters no longer configured are kept (a cluster commented out for a day
    keeps its token) but nobody can register with them, since registration needs the cluster."""
    path = settings.tokens_path
    stored = read_tokens_file(path)
    operator = settings.operator_token.get_secret_value() if settings.operator_token else None
    worker = settings.worker_token.get_secret_value() if settings.worker_token else None
    local = LOCAL_CLUSTER  # the cluster the `worker` token stands for: this machine's
    names = [c.name for c in settings.clusters] if clusters is None else clusters
    have = dict(stored.get("clusters", {}))
    wanted = {n: have.get(n) or new_token() for n in names if n != local}
    tokens = Tokens(operator=operator or stored.get("operator") or new_token(),
                    worker=worker or stored.get("worker") or new_token(),
                    clusters={**have, **wanted}, local=local)
    if (tokens.operator, tokens.worker, tokens.clusters) != (
            stored.get("operator"), stored.get("worker"), have):
        write_tokens_file(path, tokens)
    return tokens


class Authenticator:
    def __init__(self, tokens: Tokens, active: set[str] | None = None) -> None:
        self.tokens = tokens
        self._operator = tokens.operator.encode()
        # Only clusters the orchestrator runs accept registrations (None: every known one).
        self._active = active
        self._bootstrap: dict[str, bytes] = {}
        self._load_bootstrap()
        self._sessions: dict[str, str] = {}  # sha256(token) -> worker id

    def _load_bootstrap(self) -> None:
        self._bootstrap = {name: token.encode() for name, token in self.tokens.bootstrap().items()
                           if self._active is None or name in self._active
                           or name == self.tokens.local}

    def rotate(self, cluster: str) -> str:
        """A fresh bootstrap token for `cluster`; the old one stops working now."""
        token = new_token()
        if cluster == self.tokens.local:
            self.tokens.worker = token
        else:
            self.tokens.clusters[cluster] = token
        self._load_bootstrap()
        return token

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
        worker_id = self._sessions.get(hash_token(token))
        if worker_id:
            return Principal("worker", worker_id)
        # Every cluster's token is compared (no early exit): the time taken does not say which
        # cluster, if any, a guess came close to.
        found = None
        for name, expected in self._bootstrap.items():
            if hmac.compare_digest(raw, expected):
                found = name
        return Principal("bootstrap", cluster=found) if found is not None else None
