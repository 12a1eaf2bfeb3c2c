"""Stitching a job's streamed outputs back into whole files (`relaymd results`).

Every attempt's engine wrote fresh output files, starting after the checkpoint it resumed from;
each attempt's index (`output_index_key`) lists its parts and that resume point, with the output
lengths the resumed checkpoint's manifest recorded. So the result is found from the end: the
completing attempt whole (or, for an unfinished job, its newest accepted checkpoint's lengths),
preceded by the attempt it resumed from, cut at the resumed checkpoint's lengths, and so on back
to the attempt that started fresh. Attempts that nobody resumed from, and bytes past a cut, are
redone work and are left out. Every part's sha256 is checked. The newest accepted checkpoint set
comes with them (the state to continue from, or the final one), sha256 checked too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaymd.models import JobDetail, JobStatus
from relaymd.storage import (
    ObjectNotFound,
    Storage,
    manifest_key,
    output_index_key,
    output_part_key,
)
from relaymd.storage.bundle import BundleError, download_checkpoint


class StitchError(Exception):
    """The outputs cannot be put together exactly (a part missing, corrupt, or out of order)."""


@dataclass
class Segment:
    """One attempt's share of the result: its parts, cut at `cut` (None: whole)."""

    attempt: int
    index: dict[str, Any]
    cut: dict[str, int] | None


@dataclass
class Stitched:
    files: dict[str, int] = field(default_factory=dict)  # path -> bytes written
    attempts: list[int] = field(default_factory=list)  # in order
    discarded: int = 0  # bytes stored but redone by a later attempt


def read_index(storage: Storage, job_id: str, attempt: int) -> dict[str, Any] | None:
    try:
        raw = storage.get_bytes(output_index_key(job_id, attempt))
    except ObjectNotFound:
        return None
    try:
        index = json.loads(raw)
        if not isinstance(index, dict) or not isinstance(index.get("files"), dict):
            raise ValueError("no `files` map")
    except ValueError as exc:
        raise StitchError(f"attempt {attempt}'s output index is unreadable: {exc}") from None
    return index


def lineage(storage: Storage, job_id: str, last_attempt: int,
            last_cut: dict[str, int] | None) -> list[Segment]:
    """The attempts whose outputs make up the result, oldest first, each with its cut."""
    chain: list[Segment] = []
    attempt: int | None = last_attempt
    cut = last_cut
    seen: set[int] = set()
    while attempt is not None:
        if attempt in seen:
            raise StitchError(f"attempt {attempt} resumes from itself")
        seen.add(attempt)
        index = read_index(storage, job_id, attempt)
        if index is None:
            if cut is not None and not any(cut.values()):
                break  # an attempt that wrote nothing before its checkpoint: nothing to add
            raise StitchError(f"attempt {attempt} has no output index in storage")
        chain.append(Segment(attempt, index, cut))
        resumed = index.get("resumed_from")
        if not resumed:
            break
        attempt, cut = resumed.get("attempt"), resumed.get("outputs")
        if not isinstance(attempt, int) or not isinstance(cut, dict):
            raise StitchError(f"attempt {chain[-1].attempt} resumed from a checkpoint with no "
                              "recorded output lengths; its outputs cannot be cut exactly")
        if not 1 <= attempt < chain[-1].attempt or not all(
                isinstance(n, int) and n >= 0 for n in cut.values()):
            raise StitchError(f"attempt {chain[-1].attempt} records an impossible resume point "
                              f"(attempt {attempt}, lengths {cut})")
    return chain[::-1]


def stitch(storage: Storage, job_id: str, chain: list[Segment], dest: Path,
           all_indexes: dict[int, dict[str, Any]] | None = None) -> Stitched:
    """Write each output path to dest: every segment's parts in order, cut where it says. Bytes
    of indexes not in the chain (`all_indexes`) count as discarded."""
    out = Stitched(attempts=[s.attempt for s in chain])
    paths = sorted({p for s in chain for p in s.index["files"]})
    for s in chain:
        if s.cut is not None:
            for p, n in s.cut.items():
                if n > 0 and p not in s.index["files"]:
                    raise StitchError(f"attempt {s.attempt} recorded {n} bytes of {p} but "
                                      "stored none")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="relaymd-results-") as tmp:
        part_file = Path(tmp) / "part"
        for rel in paths:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                for s in chain:
                    out.discarded += append_segment(storage, job_id, s, rel, fh, part_file)
            out.files[rel] = target.stat().st_size
    used = {s.attempt for s in chain}
    for attempt, index in (all_indexes or {}).items():
        if attempt not in used:
            out.discarded += sum(p["size"] for parts in index["files"].values() for p in parts)
    return out


def append_segment(storage: Storage, job_id: str, s: Segment, rel: str, fh: Any,
                   part_file: Path) -> int:
    """Append attempt s's bytes of `rel` to fh, up to its cut; the bytes stored past it."""
    parts = s.index["files"].get(rel, [])
    stored = sum(int(p["size"]) for p in parts)
    want = stored if s.cut is None else int(s.cut.get(rel, 0))
    if want > stored:
        raise StitchError(f"attempt {s.attempt} stored {stored} bytes of {rel} but its "
                          f"checkpoint recorded {want}")
    offset = 0
    for k, p in enumerate(parts):
        if offset >= want:
            break
        if int(p["offset"]) != offset:
            raise StitchError(f"attempt {s.attempt}, {rel}: part {k} starts at {p['offset']}, "
                              f"expected {offset}")
        storage.get_file(output_part_key(job_id, s.attempt, rel, k), part_file,
                         expected_sha256=str(p["sha256"]))
        if part_file.stat().st_size != int(p["size"]):
            raise StitchError(f"attempt {s.attempt}, {rel}: part {k} is not {p['size']} bytes")
        take = min(int(p["size"]), want - offset)
        with open(part_file, "rb") as src:
            copy_prefix(src, fh, take)
        offset += int(p["size"])
    return stored - want


def copy_prefix(src: Any, dst: Any, n: int) -> None:
    while n > 0:
        data = src.read(min(n, 1 << 20))
        if not data:
            raise StitchError("a part ended early")
        dst.write(data)
        n -= len(data)


def gather(storage: Storage, job_id: str, attempts: int) -> dict[int, dict[str, Any]]:
    """Every attempt's index that exists (1..attempts)."""
    found = {}
    for n in range(1, attempts + 1):
        index = read_index(storage, job_id, n)
        if index is not None:
            found[n] = index
    return found


def fetch_results(storage: Storage, detail: JobDetail, dest: Path) -> dict[str, Any]:
    """Everything a job has produced, into dest: its outputs stitched (a completed job's whole,
    an unfinished one's up to its newest accepted checkpoint) and that checkpoint set extracted
    into dest/checkpoint-SEQ/. Returns the summary `relaymd results` prints."""
    kept = detail.checkpoint_list
    newest = kept[-1] if kept else None
    done = detail.status == JobStatus.completed
    if not detail.spec.outputs and newest is None:
        raise StitchError("it declares no outputs (`outputs:` in its relaymd.yaml) and has no "
                          "accepted checkpoint yet: nothing to fetch")
    summary: dict[str, Any] = {"job_id": detail.id, "dir": str(dest.resolve()), "complete": done,
                               "status": str(detail.status), "files": {}, "attempts": [],
                               "discarded_bytes": 0, "checkpoint": None}
    if detail.spec.outputs:
        if done:
            last, cut = detail.attempt, None
        elif newest is not None:
            manifest = json.loads(storage.get_bytes(manifest_key(detail.id, newest.seq)))
            last, cut = int(manifest["attempt"]), dict(manifest.get("outputs") or {})
        else:
            raise StitchError("it has no accepted checkpoint yet: no outputs to fetch")
        chain = lineage(storage, detail.id, last, cut)
        stitched = stitch(storage, detail.id, chain, dest, gather(storage, detail.id,
                                                                  detail.attempt))
        summary.update(files=stitched.files, attempts=stitched.attempts,
                       discarded_bytes=stitched.discarded)
    if newest is not None:
        where = dest / f"checkpoint-{newest.seq}"
        if where.name in {Path(p).parts[0] for p in summary["files"]}:
            raise StitchError(f"an output is named {where.name}/, where the checkpoint goes")
        try:
            info = download_checkpoint(storage, newest.key, newest.sha256, where)
        except BundleError as exc:
            raise StitchError(f"checkpoint {newest.seq}: {exc}") from None
        files = sorted(str(p.relative_to(where)) for p in where.rglob("*") if p.is_file())
        summary["checkpoint"] = {"seq": newest.seq, "dir": str(where.resolve()),
                                 "files": files, "members": info.members,
                                 "sha256": newest.sha256}
    return summary


__all__ = ["Segment", "StitchError", "Stitched", "fetch_results", "gather", "lineage", "stitch"]
