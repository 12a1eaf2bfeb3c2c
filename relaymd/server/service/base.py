"""The service's shared state and its errors: what every feature module (jobs, fleet,
leases, upkeep) builds on."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from relaymd.config import ClusterConfig, OrchestratorSettings
from relaymd.models import LIVE_WORKER_STATES, BundleSpec, BundleUploaded
from relaymd.server.auth import Authenticator
from relaymd.server.errors import BadRequest, ConflictError, Forbidden, NotFound  # noqa: F401
from relaymd.server.store import Store
from relaymd.server.transitions import StateMachine
from relaymd.server.views import JobJsonCache
from relaymd.storage import Storage

log = logging.getLogger(__name__)
LIVE = sorted(s.value for s in LIVE_WORKER_STATES)
STORAGE_TIMEOUT = 300.0
PENDING_BUNDLES = 1000  # uploaded bundles whose spec is kept in memory until their job exists
REGISTRATION_MARGIN = 2  # live registrations a cluster may hold past its max_workers (at least)



def parse_bundle_spec(raw: bytes | None, where: str) -> BundleSpec:
    if raw is None:
        raise BadRequest(f"{where}: bundle has no relaymd.yaml at its root; "
                         "add one or pass --command to `relaymd submit`", "invalid_bundle", 422)
    try:
        try:
            data = yaml.safe_load(raw) or {}
        except (yaml.YAMLError, RecursionError, ValueError, TypeError, UnicodeError):
            raise
        except Exception as exc:
            # PyYAML's constructors are not hardened: `!!timestamp foo` dies with an
            # AttributeError inside PyYAML. A submitted file is hostile input: whatever the
            # loader raises means it cannot be read, never a 500.
            raise ValueError(f"{type(exc).__name__} while reading it") from None
        spec = BundleSpec.model_validate(data)
        spec.model_dump_json()  # text that cannot be written back out (lone surrogates) is refused
        return spec
    except (yaml.YAMLError, RecursionError) as exc:
        raise BadRequest(f"{where}: relaymd.yaml is not valid YAML (or nested too deeply): "
                         f"{str(exc)[:300]}", "invalid_bundle", 422) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise BadRequest(f"{where}: relaymd.yaml: {field}: {first['msg']}", "invalid_bundle",
                         422) from None
    except (ValueError, TypeError, UnicodeError, PydanticSerializationError) as exc:
        # PyYAML raises plain ValueError for values it cannot construct (`2001-13-01`, `!!int x`)
        # and worse for some (above)
        raise BadRequest(f"{where}: relaymd.yaml has a value that cannot be read: "
                         f"{str(exc)[:300]}", "invalid_bundle", 422) from None


class ServiceBase:
    """State shared by the feature mixins; `Service` (service/__init__.py) combines them."""

    def __init__(self, settings: OrchestratorSettings, store: Store, storage: Storage, auth: Authenticator,
                 clock: Callable[[], float] = time.time,
                 clusters: list[ClusterConfig] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.auth = auth
        self.clock = clock
        self.machine = StateMachine(store, clock, settings.quarantine_after)
        self.last_seen: dict[str, float] = {}
        self._progress: dict[str, tuple[str, int, dict[str, Any]]] = {}
        self._job_json = JobJsonCache()
        # Specs of bundles uploaded but not yet turned into jobs, newest last. Bounded: one that
        # falls out is read back from storage if its job is ever created (_bundle_for).
        self._pending_bundles: OrderedDict[str, BundleUploaded] = OrderedDict()
        # The console subscribes here: called with ("jobs", job_id) or ("workers", worker_id)
        # after each committed change, the id None when many rows may have changed.
        self.listeners: list[Callable[[str, str | None], None]] = []
        self._gc_tasks: dict[str, asyncio.Task[None]] = {}  # job id -> its running prune
        self._gc_again: set[str] = set()
        self.started_at = clock()
        # The clusters workers may come from (configured, plus this machine's own).
        self.cluster_configs = {c.name: c for c in (settings.clusters if clusters is None else clusters)}
        self._priorities = {c.name: c.priority or 0 for c in self.cluster_configs.values()}
        self.last_claim: dict[str, float] = {}  # worker id -> when it last asked for work
        self._flood_logged: dict[str, float] = {}  # cluster -> when a refused flood was logged
        # Accounting (accounting.py): job id -> its cached history and figures (an `Entry`),
        # and worker id -> (GPUs, cluster) of the workers that ran attempts.
        self._usage_histories: dict[str, Any] = {}
        self._usage_workers: dict[str, tuple[int, str]] = {}

    def changed(self, what: str, key: str | None = None) -> None:
        for listener in self.listeners:
            try:
                listener(what, key)
            except Exception:  # a broken listener must never break the API
                log.exception("change listener failed")

    async def _storage(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.wait_for(asyncio.to_thread(fn, *args), STORAGE_TIMEOUT)

    async def load(self) -> None:
        """After a (re)start: restore session tokens, give live workers a full timeout."""
        self.auth.set_sessions(await self.store.aio.worker_tokens())
        now = self.clock()
        for w in await self.store.aio.list_workers(LIVE):
            self.last_seen[w["id"]] = now
            self.last_claim[w["id"]] = now  # given the benefit of the doubt, like last_seen

