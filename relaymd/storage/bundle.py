"""Job bundles: packing an input directory into `bundle.tar.gz`, and reading one back safely.

A bundle comes from whoever submitted the job, so reading treats it as hostile: `archive.scan`
judges every member as the bytes flow, extraction re-checks everything itself, and tarfile's
'data' filter stands behind that. Checkpoint restores live in `checkpoints.py`; their names are
re-exported here for the callers that import them from this module.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relaymd.storage.archive import (
    BundleError,
    BundleInfo,
    BundleLimits,
    Tap,
    ancestors,
    clean_name,
    scan,
)
from relaymd.storage.checkpoints import (
    checkpoint_refusal,
    extract_checkpoint,
    glob_matches,
    manifest_files,
)

if TYPE_CHECKING:
    from relaymd.storage.base import Storage

__all__ = [
    "BundleError",
    "BundleInfo",
    "BundleLimits",
    "checkpoint_refusal",
    "download_checkpoint",
    "extract_bundle",
    "extract_checkpoint",
    "glob_matches",
    "inspect_bundle",
    "manifest_files",
    "pack_directory",
    "read_member",
]


# -- packing ----------------------------------------------------------------------------------


def _collect(root: Path, src: Path) -> dict[str, Path | None]:
    """Everything under `root` as arcname -> file to read (None for a directory)."""
    entries: dict[str, Path | None] = {}

    def walk(directory: Path, prefix: str, above: frozenset[Path]) -> None:
        for entry in os.scandir(directory):
            name, path = prefix + entry.name, Path(entry.path)
            if entry.is_symlink():
                path = Path(os.path.realpath(path))
                if not path.is_relative_to(root):
                    raise BundleError(
                        f"{src / name} is a symlink to {path}, outside {src}; copy the file in "
                        "or remove the link"
                    )
            try:
                mode = path.stat().st_mode
            except FileNotFoundError:
                raise BundleError(f"{src / name} is a broken symlink; fix or remove it") from None
            if stat.S_ISDIR(mode):
                if path in above:
                    raise BundleError(f"{src / name} is a symlink loop; remove it")
                entries[name] = None
                walk(path, name + "/", above | {path})
            elif stat.S_ISREG(mode):
                entries[name] = path
            else:
                raise BundleError(f"{src / name} is not a regular file or directory; remove it")

    walk(root, "", frozenset({root}))
    return entries


def pack_directory(
    src: Path, dest: Path, *, extra_files: dict[str, bytes] | None = None
) -> BundleInfo:
    """Write src's contents (names relative to src, sorted) to the tar.gz `dest`.

    Symlinks staying inside src are stored as what they point to; `extra_files` (name -> bytes)
    adds or replaces members, e.g. a generated relaymd.yaml.
    """
    src, dest = Path(src), Path(dest)
    if not src.is_dir():
        raise BundleError(f"{src} is not a directory; point at the job's input directory")
    root = Path(os.path.realpath(src))
    if Path(os.path.realpath(dest.parent)).is_relative_to(root):
        raise BundleError(f"bundle destination {dest} lies inside {src}; write it elsewhere")
    try:
        entries: dict[str, Path | bytes | None] = dict(_collect(root, src))
    except OSError as exc:
        raise BundleError(f"cannot read {src}: {exc}") from exc
    for name, data in (extra_files or {}).items():
        clean = clean_name(name)
        if not clean or (clean in entries and entries[clean] is None):
            raise BundleError(f"extra bundle file {name!r} would replace a directory")
        entries[clean] = data

    tmp = dest.with_name(dest.name + ".part")
    members = total = 0
    try:
        with open(tmp, "wb") as out:
            sink = Tap(out)  # type: ignore[arg-type]
            with (
                gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=6, mtime=0) as gz,
                tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
            ):
                for name in sorted(entries):
                    source = entries[name]
                    info = tarfile.TarInfo(name)
                    if source is None:
                        info.type, info.mode = tarfile.DIRTYPE, 0o755
                        info.mtime = int((root / name).stat().st_mtime)
                        tar.addfile(info)
                    elif isinstance(source, bytes):
                        info.size, info.mode, info.mtime = len(source), 0o644, int(time.time())
                        tar.addfile(info, io.BytesIO(source))
                    else:
                        with open(source, "rb") as f:
                            st = os.fstat(f.fileno())
                            info.size, info.mtime = st.st_size, int(st.st_mtime)
                            info.mode = stat.S_IMODE(st.st_mode) & 0o777
                            tar.addfile(info, f)
                    members += 1
                    total += info.size
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        raise BundleError(f"cannot pack {src} into {dest}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return BundleInfo(sink.digest.hexdigest(), sink.count, members, total)


# -- reading ----------------------------------------------------------------------------------


def inspect_bundle(path: Path, limits: BundleLimits = BundleLimits()) -> BundleInfo:  # noqa: B008
    """Read the whole bundle once without extracting; BundleError if anything is hostile."""
    info = scan(Path(path), limits)
    assert info is not None
    return info


def read_member(path: Path, name: str, *, max_bytes: int = 1 << 20) -> bytes | None:
    """The contents of regular-file member `name` (e.g. "relaymd.yaml"), or None if absent."""
    wanted, found = clean_name(name), []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if clean != wanted or not member.isreg():
            return False
        if member.size > max_bytes:
            raise BundleError(f"bundle member {clean} is over {max_bytes} bytes; refusing it")
        found.append(tar.extractfile(member).read())  # type: ignore[union-attr]
        return True

    scan(Path(path), BundleLimits(), visit)
    return found[0] if found else None


def extract_bundle(
    path: Path,
    dest: Path,
    limits: BundleLimits = BundleLimits(),  # noqa: B008
) -> BundleInfo:
    """Check and extract the bundle into `dest` (created); nothing is written outside it.

    On error, whatever this call created is removed (all of `dest` if it did not exist).
    """
    dest = Path(dest)
    existed = os.path.lexists(dest)
    if existed and not dest.is_dir():
        raise BundleError(f"cannot extract into {dest}: it exists and is not a directory")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BundleError(f"cannot create {dest}: {exc.strerror or exc}") from exc
    root = os.path.realpath(dest)
    created: list[str] = []

    def visit(tar: tarfile.TarFile, member: tarfile.TarInfo, clean: str) -> bool:
        if clean:
            for target in [*ancestors(clean), clean]:
                if not os.path.lexists(os.path.join(root, target)):
                    created.append(os.path.join(root, target))
            tar.extract(member, path=root, set_attrs=True, filter="data")
        return False

    try:
        info = scan(Path(path), limits, visit)
    except BaseException:
        if not existed:
            shutil.rmtree(dest, ignore_errors=True)
        for target in reversed(created if existed else []):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target, ignore_errors=True)
            elif os.path.lexists(target):
                os.unlink(target)
        raise
    assert info is not None
    return info


def download_checkpoint(storage: Storage, key: str, sha256: str, dest: Path) -> BundleInfo:
    """Fetch a stored checkpoint (sha256 checked) and unpack it into `dest` with the bundle
    scanner (nothing but plain files inside it): what `relaymd checkpoints --download` and
    `relaymd results` hand the operator. StorageError or BundleError when it cannot."""
    with tempfile.TemporaryDirectory(prefix="relaymd-ckpt-") as tmp:
        archive = Path(tmp) / "checkpoint.tar.gz"
        storage.get_file(key, archive, expected_sha256=sha256)
        return extract_bundle(archive, dest)
