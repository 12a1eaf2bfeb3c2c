"""The orchestrator's operations: what the API routes, the console and the scheduler call.

Reads go to the store; every state change goes through `StateMachine`; storage calls run in
threads. Worker liveness (heartbeat times) and progress live in memory and are flushed to the
store by the maintenance job: a heartbeat is not a promise that anything was saved.
"""

from relaymd.server.service.accounting import AccountingOps
from relaymd.server.service.base import (
    PENDING_BUNDLES,
    STORAGE_TIMEOUT,
    BadRequest,
    ConflictError,
    Forbidden,
    NotFound,
    parse_bundle_spec,
)
from relaymd.server.service.fleet import FleetOps
from relaymd.server.service.jobs import JobOps
from relaymd.server.service.leases import LeaseOps
from relaymd.server.service.upkeep import UpkeepOps

__all__ = ["PENDING_BUNDLES", "STORAGE_TIMEOUT", "BadRequest", "ConflictError", "Forbidden",
           "NotFound", "Service", "parse_bundle_spec"]


class Service(JobOps, FleetOps, LeaseOps, UpkeepOps, AccountingOps):
    """The orchestrator's operations, one feature per module: jobs (operator), fleet
    (registration, clusters, tokens, liveness), leases (what workers do with a job), upkeep
    (storage), accounting (GPU-hours, rates, ETAs). State lives in `ServiceBase`."""
