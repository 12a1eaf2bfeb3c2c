"""A job's output files (`outputs:` globs), streamed to storage as they grow.

Each attempt's engine appends to fresh output files (outputs are never restored on resume). At
each checkpoint the worker ships only the bytes added since its last upload, as a numbered part,
up to the length stat'd when the checkpoint set was taken, or, for an engine that removes its
sentinel while it checkpoints, when it removed it (relaymd/worker/marks.py; the length goes into
the manifest);
whatever remains is shipped when the job completes or is handed off. The attempt's index
(`output_index_key`) lists every part with its offset, size and sha256, and the checkpoint this
attempt resumed from (with that checkpoint's recorded output lengths): `relaymd results` follows
those resume points back from the end and stitches the attempts exactly (relaymd/results.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from relaymd.storage import Storage, output_index_key, output_part_key
from relaymd.worker.checkpoint import scan
from relaymd.worker.gateway import Gateway
from relaymd.worker.marks import Mark, SentinelMarks

log = logging.getLogger("relaymd.worker")
CHUNK = 1 << 20


def remove_outputs(job_dir: Path, patterns: list[str]) -> None:
    """A new attempt starts its outputs fresh: drop any the bundle or a checkpoint brought."""
    for rel in scan(job_dir, patterns):
        (job_dir / rel).unlink(missing_ok=True)


def copy_range(src: Path, start: int, end: int, dest: Path) -> str:
    """Copy bytes [start, end) of src into dest; their sha256. ValueError if src is shorter."""
    digest = hashlib.sha256()
    with open(src, "rb") as fh, open(dest, "wb") as out:
        fh.seek(start)
        left = end - start
        while left > 0:
            data = fh.read(min(CHUNK, left))
            if not data:
                raise ValueError(f"{src.name} shrank below {end} bytes")
            digest.update(data)
            out.write(data)
            left -= len(data)
    return digest.hexdigest()


class OutputStream:
    """One attempt's outputs: what has been shipped, and shipping the rest."""

    def __init__(self, job_id: str, attempt: int, job_dir: Path, patterns: list[str],
                 storage: Storage, gateway: Gateway, workdir: Path,
                 resumed_from: dict[str, Any] | None, sentinel: str | None = None) -> None:
        self.job_id, self.attempt, self.job_dir = job_id, attempt, job_dir
        self.patterns, self.storage, self.gateway, self.workdir = (patterns, storage, gateway,
                                                                   workdir)
        # An engine that removes its sentinel while it checkpoints: lengths at that instant.
        self.marks = SentinelMarks(job_dir, sentinel, self.lengths) if sentinel else None
        if self.marks is not None and not self.marks.start():
            self.marks = None
        self.sent: dict[str, int] = {}  # path -> bytes shipped
        self.index: dict[str, Any] = {"job_id": job_id, "attempt": attempt,
                                      "resumed_from": resumed_from, "files": {}, "final": False}

    def lengths(self) -> dict[str, int]:
        """The outputs' lengths now (take them with the checkpoint set, before packing)."""
        return {rel: size for rel, (size, _) in scan(self.job_dir, self.patterns).items()}

    def at_checkpoint(self) -> tuple[dict[str, int], Mark | None, int]:
        """The lengths that belong to the checkpoint set about to be packed: those marked when
        the engine removed its sentinel to write it, else the lengths now; with the mark (to
        hand back to `shipped`) and the count of sentinel removals they were taken at (compare
        `checkpoint_began_since` after packing)."""
        mark = self.marks.take() if self.marks is not None else None
        if mark is None:
            return self.lengths(), None, self.marks.generation() if self.marks is not None else 0
        if not mark.exact:
            log.warning("the outputs' lengths were read after the engine had finished writing "
                        "this checkpoint: a sample written in between would be repeated after "
                        "a resume from it", extra={"job_id": self.job_id})
        return mark.lengths, mark, mark.generation

    def checkpoint_began_since(self, generation: int) -> bool:
        """Has the engine removed its sentinel again (begun another checkpoint)?"""
        return self.marks is not None and self.marks.generation() != generation

    def shipped(self, mark: Mark | None) -> None:
        """The set those lengths went with was shipped: its mark serves no other."""
        if self.marks is not None and mark is not None:
            self.marks.shipped(mark)

    def close(self) -> None:
        if self.marks is not None:
            self.marks.close()

    async def ship(self, lengths: dict[str, int], *, final: bool = False,
                   patience: float = 600) -> None:
        """Upload each output's bytes from what was shipped up to `lengths`, then the index.
        Raises (after the gateway's retries) when storage would not take them."""
        for rel, length in sorted(lengths.items()):
            done = self.sent.get(rel, 0)
            if length < done:
                log.error("output %s shrank from %d to %d bytes: an engine must only append to "
                          "its outputs", rel, done, length, extra={"job_id": self.job_id})
                continue
            if length == done:
                continue
            parts = self.index["files"].setdefault(rel, [])
            key = output_part_key(self.job_id, self.attempt, rel, len(parts))
            with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
                part = Path(tmp) / "part"
                sha = await asyncio.to_thread(copy_range, self.job_dir / rel, done, length, part)
                await self.gateway.call("upload output", self.storage.put_file, key, part,
                                        overwrite=True, give_up_after=patience)
            parts.append({"offset": done, "size": length - done, "sha256": sha})
            self.sent[rel] = length
        self.index["final"] = final
        await self.gateway.call("upload output index", self.storage.put_bytes,
                                output_index_key(self.job_id, self.attempt),
                                json.dumps(self.index).encode(), overwrite=True,
                                give_up_after=min(patience, 120))

    async def ship_rest(self, *, final: bool, patience: float) -> bool:
        """Ship whatever remains (the job completed or is handed off); False if it failed."""
        try:
            await self.ship(self.lengths(), final=final, patience=patience)
        except Exception as exc:
            log.error("outputs not shipped: %s", exc, extra={"job_id": self.job_id})
            return False
        return True
