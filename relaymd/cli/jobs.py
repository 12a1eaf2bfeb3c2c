"""The job commands: submit, jobs, job, cancel, requeue, checkpoints, purge, results. All talk
to the orchestrator over HTTP; `checkpoints --download` and `results` also read the storage
directly."""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import yaml
from rich.console import Console
from rich.markup import escape

from relaymd.cli.common import call, client_of, die, emit_json, json_option, settings_of, url_option
from relaymd.cli.tables import (
    age,
    checkpoints_table,
    duration,
    events_table,
    gpu_hours_text,
    job_checkpoints_table,
    jobs_table,
    progress_text,
    rate_text,
    styled,
)
from relaymd.client import Client
from relaymd.models import Job, JobCreate, JobStatus


def bundle_spec_for(src: Path, command: str | None, checkpoint: tuple[str, ...],
                    gpus: int | None, max_attempts: int | None) -> dict[str, Any]:
    """relaymd.yaml contents: the directory's own file with the command-line flags on top."""
    from relaymd.submitting import SpecError, build_spec

    if command is None and not (src / "relaymd.yaml").exists():
        die(f"{src} has no relaymd.yaml; pass --command (and --checkpoint) to write one", 2)
    try:
        return build_spec(src, command, list(checkpoint), gpus, max_attempts)
    except SpecError as exc:
        die(str(exc), 2)


@click.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--title", default=None, help="a name for the job (default: the directory name)")
@click.option("--command", "command", help="engine command, run in the job dir")
@click.option("--checkpoint", multiple=True, help="glob of checkpoint files (repeatable)")
@click.option("--gpus", type=click.IntRange(0, 64), help="GPUs the job needs")
@click.option("--max-attempts", type=click.IntRange(1, 1000), help="engine failures allowed")
@click.option("--priority", type=click.IntRange(-1000, 1000), default=0, show_default=True)
@click.option("--cluster", "clusters", multiple=True, metavar="NAME",
              help="run only on workers of this cluster (repeatable; default: anywhere)")
@click.option("--trusted-only", is_flag=True, default=None,
              help="never run on an untrusted cluster (Salad); also `trusted_only: true` in "
              "relaymd.yaml")
@url_option
@json_option
@click.pass_context
def submit(ctx: click.Context, directory: Path, title: str | None, command: str | None,
           checkpoint: tuple[str, ...], gpus: int | None, max_attempts: int | None,
           priority: int, clusters: tuple[str, ...], trusted_only: bool | None, url: str | None,
           as_json: bool) -> None:
    """Pack DIRECTORY into a bundle, upload it and queue the job."""
    from relaymd.storage.bundle import BundleError, pack_directory

    spec = bundle_spec_for(directory, command, checkpoint, gpus, max_attempts)
    job_id = uuid.uuid4().hex
    with client_of(ctx, url) as client, tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.tar.gz"
        try:
            info = pack_directory(directory, bundle, extra_files={
                "relaymd.yaml": yaml.safe_dump(spec, sort_keys=False).encode()})
        except BundleError as exc:
            die(f"{directory}: {exc}")
        if not as_json:
            click.echo(f"uploading {directory} ({info.size / 1e6:.1f} MB, {info.members} files)",
                       err=True)
        call(lambda: client.upload_bundle(job_id, bundle))
        job = call(lambda: client.create_job(JobCreate(
            id=job_id, title=title if title is not None else directory.resolve().name,
            max_attempts=max_attempts, gpus=gpus, priority=priority,
            preferred_clusters=list(clusters) or None, trusted_only=trusted_only or None)))
    if as_json:
        emit_json(job)
    else:
        click.echo(f"submitted job {job.id[:8]} ({job.title}): {job.status}")


@click.command()
@click.option("--status", "statuses", multiple=True,
              type=click.Choice([s.value for s in JobStatus]), help="only these states")
@url_option
@json_option
@click.pass_context
def jobs(ctx: click.Context, statuses: tuple[str, ...], url: str | None, as_json: bool) -> None:
    """List jobs."""
    with client_of(ctx, url) as client:
        listed = call(lambda: client.all_jobs(list(statuses) or None))
    if as_json:
        emit_json(listed)
    elif not listed:
        click.echo("no jobs")
    else:
        Console().print(jobs_table(listed))


@click.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def job(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Show one job (a unique id prefix is enough): state, checkpoints, history."""
    with client_of(ctx, url) as client:
        detail = call(lambda: client.get_job(job_ref))
    if as_json:
        emit_json(detail)
        return
    out = Console()
    out.print(f"[bold]job {detail.id}[/]  {escape(detail.title)}")
    out.print(f"  status     {styled(detail.status)}   attempt {detail.attempt}   "
              f"failures {detail.failures}/{detail.max_attempts}")
    out.print(f"  command    {escape(detail.command)}")
    out.print(f"  progress   {progress_text(detail)}")
    if detail.ns_per_day is not None or detail.eta_seconds is not None:
        out.print(f"  rate       {rate_text(detail.ns_per_day)}   "
                  f"ETA {duration(detail.eta_seconds)}")
    if detail.attempt:
        out.print(f"  compute    {gpu_hours_text(detail.gpu_hours, detail.gpu_hours_redone)}")
    out.print(f"  worker     {detail.worker_id or '-'}")
    if detail.preferred_clusters:
        out.print(f"  clusters   {escape(', '.join(detail.preferred_clusters))} only")
    if detail.trusted_only:
        out.print("  trust      trusted clusters only")
    if detail.queue_blocked_reason:
        out.print(f"  [yellow]waiting[/]    {escape(detail.queue_blocked_reason)}")
    out.print(f"  created    {detail.created_at:%Y-%m-%d %H:%M:%S} UTC ({age(detail.created_at)} ago)")
    if detail.last_failure:
        f = detail.last_failure
        out.print(f"  last failure (attempt {f.attempt}, exit {f.exit_code}): {escape(f.reason)}")
        for line in f.log_tail.splitlines()[-10:]:
            out.print(f"    | {line}", markup=False, highlight=False)
    if detail.checkpoint_list:
        out.print("  checkpoints")
        out.print(job_checkpoints_table(detail.checkpoint_list))
    out.print("  events")
    out.print(events_table(detail.events))


def _transition(ctx: click.Context, job_ref: str, url: str | None, as_json: bool,
                verb: str, fn: Callable[[Client, str], Job]) -> None:
    with client_of(ctx, url) as client:
        changed = call(lambda: fn(client, job_ref))
    if as_json:
        emit_json(changed)
    else:
        click.echo(f"{verb} job {changed.id[:8]}: {changed.status}")


@click.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def cancel(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Cancel a queued or running job (its worker is told to stop)."""
    _transition(ctx, job_ref, url, as_json, "cancelled", Client.cancel)


@click.command()
@click.argument("job_ref")
@url_option
@json_option
@click.pass_context
def requeue(ctx: click.Context, job_ref: str, url: str | None, as_json: bool) -> None:
    """Put a job back in the queue (failed and cancelled jobs get a fresh failure budget)."""
    _transition(ctx, job_ref, url, as_json, "requeued", Client.requeue)


@click.command()
@click.argument("job_ref")
@click.option("--download", "download", is_flag=False, flag_value="", default=None,
              metavar="[DIR]", help="fetch, verify and extract a checkpoint into DIR "
              "(default ./JOBID-checkpoint-SEQ)")
@click.option("--seq", type=int, help="which checkpoint to download (default: the latest)")
@url_option
@json_option
@click.pass_context
def checkpoints(ctx: click.Context, job_ref: str, download: str | None, seq: int | None,
                url: str | None, as_json: bool) -> None:
    """List a job's stored checkpoints, or download one (sha256 checked) and extract it."""
    with client_of(ctx, url) as client:
        detail = call(lambda: client.get_job(job_ref))
    kept = detail.checkpoint_list
    if download is None:
        if seq is not None:
            die("--seq goes with --download")
        if as_json:
            emit_json(kept)
        elif not kept:
            click.echo(f"job {detail.id[:8]} has no checkpoints yet")
        else:
            Console().print(checkpoints_table(kept))
        return
    if not kept:
        die(f"job {detail.id[:8]} has no checkpoints to download")
    chosen = kept[-1] if seq is None else next((c for c in kept if c.seq == seq), None)
    if chosen is None:
        die(f"job {detail.id[:8]} has no checkpoint {seq}; stored: "
            f"{', '.join(str(c.seq) for c in kept)} (older ones are deleted after newer ones)")
    dest = Path(download or f"{detail.id[:12]}-checkpoint-{chosen.seq}")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        die(f"{dest} exists and is not an empty directory; name another with --download DIR")
    from relaymd.storage import StorageError
    from relaymd.storage.bundle import BundleError, download_checkpoint

    try:
        info = download_checkpoint(settings_of(ctx).open_storage(), chosen.key, chosen.sha256,
                                   dest)
    except (StorageError, BundleError) as exc:
        die(f"checkpoint {chosen.seq} of job {detail.id[:8]}: {exc}")
    if as_json:
        click.echo(json.dumps({"job_id": detail.id, "seq": chosen.seq, "dir": str(dest.resolve()),
                               "sha256": chosen.sha256, "members": info.members}))
    else:
        click.echo(f"checkpoint {chosen.seq} of job {detail.id[:8]} (sha256 verified) extracted "
                   f"into {dest}/ ({info.members} entries)")


@click.command()
@click.argument("job_ref")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@url_option
@json_option
@click.pass_context
def purge(ctx: click.Context, job_ref: str, yes: bool, url: str | None, as_json: bool) -> None:
    """Delete a finished job everywhere: its record, checkpoints, bundle and logs. Irreversible."""
    with client_of(ctx, url) as client:
        if not yes:
            detail = call(lambda: client.get_job(job_ref))
            what = (f"job {detail.id} ({detail.title or 'untitled'}, {detail.status}, "
                    f"{len(detail.checkpoint_list)} stored checkpoint(s))")
            if not sys.stdin.isatty():
                die(f"refusing to purge {what} without --yes (no terminal to confirm on)")
            if not click.confirm(f"Delete {what} and every stored object of it? This cannot be "
                                 "undone", default=False):
                die("purge aborted; nothing deleted")
        result = call(lambda: client.purge(job_ref))
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"purged job {result['job_id'][:8]}: {result['objects_deleted']} stored "
                   "object(s) deleted")


@click.command()
@click.argument("job_ref")
@click.argument("dest", required=False, type=click.Path(path_type=Path))
@url_option
@json_option
@click.pass_context
def results(ctx: click.Context, job_ref: str, dest: Path | None, url: str | None,
            as_json: bool) -> None:
    """Download a job's results into DEST (default ./JOBID-results/): its outputs, every
    attempt's share stitched exactly (redone work past a resume point is left out), and its
    final (or newest) checkpoint set in DEST/checkpoint-SEQ/; sha256 checked throughout."""
    from relaymd.results import StitchError, fetch_results
    from relaymd.storage import StorageError

    with client_of(ctx, url) as client:
        detail = call(lambda: client.get_job(job_ref))
    dest = dest or Path(f"{detail.id[:12]}-results")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        die(f"{dest} exists and is not an empty directory; name another DIR")
    try:
        summary = fetch_results(settings_of(ctx).open_storage(), detail, dest)
    except (StorageError, StitchError, ValueError, KeyError) as exc:
        die(f"results of job {detail.id[:8]}: {exc}")
    if as_json:
        click.echo(json.dumps(summary))
        return
    state = "" if summary["complete"] else \
        f" (job {detail.status}: up to its newest accepted checkpoint)"
    click.echo(f"results of job {detail.id[:8]} into {dest}/{state}")
    for rel, size in summary["files"].items():
        click.echo(f"  {rel}  {size} bytes")
    if summary["files"]:
        click.echo(f"  attempts stitched: {', '.join(map(str, summary['attempts']))}; "
                   f"{summary['discarded_bytes']} bytes of redone work left out")
    ckpt = summary["checkpoint"]
    if ckpt:
        n = len(ckpt["files"])
        click.echo(f"  checkpoint {ckpt['seq']} ({n} file{'' if n == 1 else 's'}) in "
                   f"{dest}/checkpoint-{ckpt['seq']}/")
    click.echo("  sha256 verified")
