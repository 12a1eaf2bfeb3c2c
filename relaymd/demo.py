"""The demo behind the README's run command: a real OpenMM job, queued when nothing is.

`relaymd --demo` starts the orchestrator on the embedded default and, if no job is waiting or
running, writes the example (villin in water, built from the OpenMM wheel's own files) under
`{home}/demo/villin` once and submits it; the local provider then starts a worker that runs it,
and checkpoints arrive every 30 s.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from relaymd.client import Client, discover_token
from relaymd.config import OrchestratorSettings
from relaymd.models import LIVE_JOB_STATES, JobCreate

log = logging.getLogger(__name__)

ACTIVE = sorted(LIVE_JOB_STATES)
TITLE = "demo: villin in water (OpenMM)"


def submit_demo(settings: OrchestratorSettings, url: str, say: Callable[[str], None] = print) -> str | None:
    """Queue the demo job unless work is already queued or running; returns its id, if any."""
    from relaymd.engines.openmm.example import write_example
    from relaymd.storage.bundle import pack_directory

    with Client(url, discover_token(settings)) as client:
        if client.list_jobs(ACTIVE, limit=1).jobs:
            say("demo: jobs are already queued or running; not adding the example")
            return None
        dest = settings.home / "demo" / "villin"
        if not (dest / "relaymd.yaml").exists():
            say(f"demo: building the example job in {dest} (villin in water, 8,867 atoms; "
                "energy minimisation takes a few seconds)")
            write_example(dest)
        job_id = uuid.uuid4().hex
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "bundle.tar.gz"
            pack_directory(dest, bundle)
            client.upload_bundle(job_id, bundle)
        job = client.create_job(JobCreate(id=job_id, title=TITLE))
    say(f"demo: submitted job {job.id[:8]} ({job.title}); a local worker will pick it up. "
        f"Watch it with `relaymd jobs` or `relaymd job {job.id[:8]}`")
    return job.id
