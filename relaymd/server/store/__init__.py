"""The SQLite store: schema, migrations and every SQL statement the orchestrator runs.

One connection, owned by one thread (a single-thread executor): all reads and writes are
serialised there, so concurrent API requests never meet "database is locked", and a state change
is one conditional UPDATE inside a `BEGIN IMMEDIATE` transaction together with its event row.
Callers on the event loop use `await store.aio.method(...)`; the methods themselves are
synchronous and refuse to run on any other thread.

- `schema`: the migrations;
- `changes`: the typed values a state change writes (no SQL crosses into the state machine);
- `core`: the connection, its thread, the transaction helper and the async facade;
- `jobs`, `workers`: the queries, by table.
"""

from relaymd.server.store.changes import (
    KEEP,
    ClaimMove,
    IfNull,
    Increment,
    JobChange,
    OnLimit,
    Swap,
    WorkerUpdate,
)
from relaymd.server.store.core import (
    AsyncStore,
    RegistrationCapped,
    StoreCore,
    WrongThread,
    dumps,
    load_json,
)
from relaymd.server.store.jobs import JobQueries
from relaymd.server.store.schema import migrations
from relaymd.server.store.workers import WorkerQueries


class Store(JobQueries, WorkerQueries):
    """The orchestrator's database: `await store.aio.X(...)` from the event loop."""


__all__ = [
    "KEEP", "AsyncStore", "ClaimMove", "IfNull", "Increment", "JobChange", "OnLimit",
    "RegistrationCapped", "Store", "StoreCore", "Swap", "WorkerUpdate", "WrongThread", "dumps",
    "load_json", "migrations",
]
