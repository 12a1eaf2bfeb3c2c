"""Turning a directory into a queued job: the bundle spec (the directory's relaymd.yaml with
overrides on top) and the pack-upload-create sequence. Shared by `relaymd submit` and the
console's submit form."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from relaymd.client import Client
from relaymd.models import BundleSpec, Job, JobCreate


class SpecError(Exception):
    """The directory or the overrides do not make a valid relaymd.yaml; says which field."""


def build_spec(src: Path, command: str | None, checkpoint: list[str], gpus: int | None,
               max_attempts: int | None) -> dict[str, Any]:
    path = src / "relaymd.yaml"
    data: dict[str, Any] = {}
    if path.exists():
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SpecError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise SpecError(f"{path}: expected a mapping")
        data = loaded
    elif not command:
        raise SpecError(f"{src} has no relaymd.yaml; give a command (and checkpoint globs) to "
                        "write one")

    def section(name: str) -> dict[str, Any]:
        value = data.get(name)
        if value is None:
            value = data[name] = {}
        if not isinstance(value, dict):
            raise SpecError(f"{path}: {name}: must be a mapping to combine it with --{name}")
        return value

    if command:
        data["command"] = command
    if checkpoint:
        section("checkpoint")["paths"] = list(checkpoint)
    if gpus is not None:
        section("resources")["gpus"] = gpus
    if max_attempts is not None:
        data["max_attempts"] = max_attempts
    try:
        BundleSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise SpecError(f"{path}: {field}: {first['msg']}") from None
    return data


def submit_directory(client: Client, directory: Path, spec: dict[str, Any], title: str | None,
                     gpus: int | None = None, max_attempts: int | None = None,
                     priority: int = 0) -> Job:
    """Pack, upload and queue; BundleError / ApiError on failure (nothing queued then)."""
    from relaymd.storage.bundle import pack_directory

    job_id = uuid.uuid4().hex
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle.tar.gz"
        pack_directory(directory, bundle, extra_files={
            "relaymd.yaml": yaml.safe_dump(spec, sort_keys=False).encode()})
        client.upload_bundle(job_id, bundle)
    return client.create_job(JobCreate(
        id=job_id, title=title if title else directory.resolve().name,
        max_attempts=max_attempts, gpus=gpus, priority=priority))
