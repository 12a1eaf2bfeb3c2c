"""Storage upkeep: pruning old checkpoints in the background."""

from __future__ import annotations

import asyncio
import logging

from relaymd.server.service.base import ServiceBase
from relaymd.storage import checkpoint_key

log = logging.getLogger(__name__)


class UpkeepOps(ServiceBase):
    # ------------------------------------------------------------------ storage upkeep

    def prune_soon(self, job_id: str) -> None:
        """Delete the job's checkpoints older than the newest `checkpoint_keep`, in the
        background (the worker's reply does not wait for storage). One prune per job at a time;
        a checkpoint accepted meanwhile gets one more pass."""
        if job_id in self._gc_tasks:
            self._gc_again.add(job_id)
            return
        task = asyncio.get_running_loop().create_task(self._prune(job_id))
        self._gc_tasks[job_id] = task

    async def _prune(self, job_id: str) -> None:
        try:
            while True:
                self._gc_again.discard(job_id)
                await self.prune(job_id)
                if job_id not in self._gc_again:
                    return
        except Exception as exc:  # storage down: the next checkpoint tries again
            log.warning("job %s: old checkpoints not deleted yet: %s", job_id[:8], exc)
        finally:
            self._gc_tasks.pop(job_id, None)

    async def prune(self, job_id: str) -> int:
        """Keep the newest `checkpoint_keep` accepted checkpoints; delete every stored checkpoint
        object below the oldest kept one (also uploads that were never accepted). Returns the
        number of objects deleted."""
        oldest_kept = await self.store.aio.prune_checkpoints(job_id,
                                           self.settings.checkpoint_keep)
        if oldest_kept is None:
            return 0
        prefix = checkpoint_key(job_id, 0).rpartition("/")[0] + "/"
        deleted = 0
        for key in await self._storage(self.storage.list, prefix):
            seq = key.rpartition("/")[2].partition(".")[0]
            if seq.isdigit() and int(seq) < oldest_kept:
                await self._storage(self.storage.delete, key)
                deleted += 1
        if deleted:
            log.info("job %s: deleted %d stored object(s) of checkpoints before %d", job_id[:8],
                     deleted, oldest_kept)
        return deleted

    async def drain(self) -> None:
        """Wait for background prunes (at shutdown)."""
        while self._gc_tasks:
            await asyncio.gather(*list(self._gc_tasks.values()), return_exceptions=True)
