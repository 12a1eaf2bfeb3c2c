"""Job bundles: packing a directory, and refusing hostile bundles without writing outside dest."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest

from relaymd.storage.bundle import (
    BundleError,
    BundleLimits,
    extract_bundle,
    inspect_bundle,
    pack_directory,
    read_member,
)


def tree(root: Path) -> dict[str, bytes | None]:
    """relative path -> contents (None for a directory)."""
    return {
        p.relative_to(root).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    src = tmp_path / "job"
    (src / "r0" / "deep").mkdir(parents=True)
    (src / "system.xml").write_bytes(b"<System/>")
    (src / "r0" / "r0_ckpt.xml").write_bytes(os.urandom(300_000))
    (src / "r0" / "deep" / "empty").write_bytes(b"")
    (src / "run.py").write_text("print('md')\n")
    (src / "run.py").chmod(0o755)
    (src / "empty-dir").mkdir()
    return src


def test_pack_inspect_extract_round_trip(job_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle.tar.gz"
    packed = pack_directory(job_dir, bundle)
    raw = bundle.read_bytes()
    assert packed.sha256 == hashlib.sha256(raw).hexdigest()
    assert packed.size == len(raw)
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names == sorted(names)
    assert "system.xml" in names and "r0/deep/empty" in names
    assert not any(n.startswith(("./", "job")) for n in names)

    assert inspect_bundle(bundle) == packed
    assert packed.members == len(tree(job_dir))
    assert packed.uncompressed_bytes == 9 + 300_000 + 12

    out = tmp_path / "out" / "job"
    assert extract_bundle(bundle, out) == packed
    assert tree(out) == tree(job_dir)
    assert os.access(out / "run.py", os.X_OK)


def test_extra_files_are_added_or_replace(job_dir: Path, tmp_path: Path) -> None:
    (job_dir / "relaymd.yaml").write_text("command: old\n")
    bundle = tmp_path / "b.tar.gz"
    extra = {"relaymd.yaml": b"command: python run.py\n", "gen/notes.txt": b"n"}
    pack_directory(job_dir, bundle, extra_files=extra)
    assert read_member(bundle, "relaymd.yaml") == b"command: python run.py\n"
    assert read_member(bundle, "gen/notes.txt") == b"n"
    assert read_member(bundle, "absent.yaml") is None
    with pytest.raises(BundleError, match="r0/r0_ckpt.xml"):
        read_member(bundle, "r0/r0_ckpt.xml", max_bytes=1000)


def test_symlink_inside_src_is_dereferenced(job_dir: Path, tmp_path: Path) -> None:
    (job_dir / "alias.xml").symlink_to("system.xml")
    (job_dir / "r0-link").symlink_to("r0")
    bundle = tmp_path / "b.tar.gz"
    pack_directory(job_dir, bundle)
    with tarfile.open(bundle) as tar:
        alias = tar.getmember("alias.xml")
        assert alias.isreg() and tar.getmember("r0-link").isdir()
    out = tmp_path / "out"
    extract_bundle(bundle, out)
    assert not (out / "alias.xml").is_symlink()
    assert (out / "alias.xml").read_bytes() == b"<System/>"
    assert (out / "r0-link" / "deep" / "empty").is_file()


def test_symlink_leaving_src_is_refused(job_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s")
    (job_dir / "r0" / "leak").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError, match="r0/leak"):
        pack_directory(job_dir, tmp_path / "b.tar.gz")
    assert not (tmp_path / "b.tar.gz").exists()


def test_pack_refuses_non_directories_and_special_files(job_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a directory"):
        pack_directory(job_dir / "system.xml", tmp_path / "b.tar.gz")
    with pytest.raises(BundleError, match="inside"):
        pack_directory(job_dir, job_dir / "b.tar.gz")
    os.mkfifo(job_dir / "pipe")
    with pytest.raises(BundleError, match="pipe"):
        pack_directory(job_dir, tmp_path / "b.tar.gz")


def test_ordinary_tar_from_other_tools_is_accepted(tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        add(tar, ".", kind=tarfile.DIRTYPE)
        add(tar, "./data", kind=tarfile.DIRTYPE)
        add(tar, "./data/a.txt", b"a")
        add(tar, "./data/b.txt", kind=tarfile.LNKTYPE, link="data/a.txt")
        add(tar, "./latest", kind=tarfile.SYMTYPE, link="data/a.txt")
    extract_bundle(bundle, tmp_path / "out")
    assert (tmp_path / "out" / "latest").read_bytes() == b"a"
    assert (tmp_path / "out" / "data" / "b.txt").read_bytes() == b"a"


# -- hostile bundles, built by hand ---------------------------------------------------------


def add(
    tar: tarfile.TarFile,
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    link: str = "",
) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def hostile(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A bundle with one harmless file first, then the hostile member(s); and the name to expect."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    path = tmp_path / f"{case}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        add(tar, "ok.txt", b"harmless")
        if case == "absolute":
            add(tar, str(outside / "abs.txt"), b"pwned")
            expect = str(outside / "abs.txt")
        elif case == "dotdot":
            add(tar, "../evil", b"pwned")
            expect = "../evil"
        elif case == "symlink-etc-passwd":
            add(tar, "passwd", kind=tarfile.SYMTYPE, link="/etc/passwd")
            expect = "passwd"
        elif case == "symlink-up":
            add(tar, "a", kind=tarfile.SYMTYPE, link="../../x")
            expect = "a"
        elif case == "write-through-symlink":
            add(tar, "out", kind=tarfile.SYMTYPE, link=str(outside))
            add(tar, "out/pwned", b"pwned")
            expect = "out"
        elif case == "symlink-chain":
            # Each link looks harmless alone; together c resolves to the parent of the root.
            add(tar, "c", kind=tarfile.SYMTYPE, link="p/q/l1/../..")
            add(tar, "p/q/l1", kind=tarfile.SYMTYPE, link="../..")
            expect = "c"
        elif case == "hardlink-out":
            add(tar, "h", kind=tarfile.LNKTYPE, link="../outside/secret")
            expect = "h"
        elif case == "hardlink-abs":
            add(tar, "h", kind=tarfile.LNKTYPE, link=str(outside / "secret"))
            expect = "h"
        elif case == "chardev":
            add(tar, "null", kind=tarfile.CHRTYPE)
            expect = "null"
        elif case == "fifo":
            add(tar, "pipe", kind=tarfile.FIFOTYPE)
            expect = "pipe"
        elif case == "duplicate":
            add(tar, "ok.txt", b"again")
            expect = "ok.txt"
        else:
            raise AssertionError(case)
    return path, expect


HOSTILE = [
    "absolute",
    "dotdot",
    "symlink-etc-passwd",
    "symlink-up",
    "write-through-symlink",
    "symlink-chain",
    "hardlink-out",
    "hardlink-abs",
    "chardev",
    "fifo",
    "duplicate",
]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_bundle_is_refused_by_inspect(tmp_path: Path, case: str) -> None:
    bundle, expect = hostile(tmp_path, case)
    with pytest.raises(BundleError) as caught:
        inspect_bundle(bundle)
    assert expect in str(caught.value)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_bundle_extraction_leaves_nothing(tmp_path: Path, case: str) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    bundle, expect = hostile(tmp_path, case)
    dest = tmp_path / "work" / "job"
    with pytest.raises(BundleError) as caught:
        extract_bundle(bundle, dest)
    assert expect in str(caught.value)
    assert not dest.exists(), "partial extraction was not cleaned up"
    assert sorted(p.name for p in (tmp_path / "outside").iterdir()) == ["secret"]
    assert os.stat(tmp_path / "outside" / "secret").st_nlink == 1
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "evil").exists()


def test_failed_extraction_into_existing_dir_removes_only_its_own_files(tmp_path: Path) -> None:
    bundle, _ = hostile(tmp_path, "fifo")
    dest = tmp_path / "job"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep")
    with pytest.raises(BundleError):
        extract_bundle(bundle, dest)
    assert tree(dest) == {"mine.txt": b"keep"}


def test_too_many_members(tmp_path: Path) -> None:
    bundle = tmp_path / "many.tar.gz"
    with tarfile.open(bundle, "w:gz") as tar:
        for i in range(5):
            add(tar, f"f{i}", b"x")
    limits = BundleLimits(max_members=3)
    with pytest.raises(BundleError, match="more than 3 members.*f3"):
        inspect_bundle(bundle, limits)
    with pytest.raises(BundleError, match="f3"):
        extract_bundle(bundle, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()
    assert inspect_bundle(bundle).members == 5


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n

    def readable(self) -> bool:
        return True


@pytest.fixture(scope="module")
def zero_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 MiB of zeros in about 100 KiB, written as a stream."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.tar.gz"
    size = 100 << 20
    with (
        open(path, "wb") as f,
        gzip.GzipFile(fileobj=f, mode="wb", compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w|") as tar,
    ):
        info = tarfile.TarInfo("zeros.dat")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros(size), 1 << 20))
    assert path.stat().st_size < 2 << 20
    return path


def test_bomb_over_the_size_limit_is_refused(zero_bomb: Path, tmp_path: Path) -> None:
    limits = BundleLimits(max_total_bytes=10 << 20)
    with pytest.raises(BundleError, match="zeros.dat"):
        inspect_bundle(zero_bomb, limits)
    with pytest.raises(BundleError, match="zeros.dat"):
        extract_bundle(zero_bomb, tmp_path / "out", limits)
    assert not (tmp_path / "out").exists()


def test_bomb_over_the_ratio_is_refused(zero_bomb: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="zeros.dat.*decompression bomb"):
        inspect_bundle(zero_bomb)
    with pytest.raises(BundleError, match="zeros.dat"):
        extract_bundle(zero_bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compressible_small_bundle_is_not_a_bomb(tmp_path: Path) -> None:
    src = tmp_path / "job"
    src.mkdir()
    (src / "zeros").write_bytes(bytes(8 << 20))
    bundle = tmp_path / "b.tar.gz"
    pack_directory(src, bundle)
    assert inspect_bundle(bundle).uncompressed_bytes == 8 << 20


def test_garbage_is_not_a_bundle(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(BundleError, match="not a gzip-compressed tar file"):
        inspect_bundle(garbage)
    text = tmp_path / "text.gz"
    text.write_bytes(gzip.compress(b"just some text, no tar headers here\n" * 40))
    with pytest.raises(BundleError, match="not a gzip-compressed tar file"):
        inspect_bundle(text)
    with pytest.raises(BundleError, match="not a gzip-compressed tar file"):
        extract_bundle(garbage, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_bundle_is_refused(job_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    pack_directory(job_dir, bundle)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(bundle.read_bytes()[: bundle.stat().st_size // 2])
    with pytest.raises(BundleError, match="truncated"):
        inspect_bundle(cut)
    with pytest.raises(BundleError, match="truncated"):
        extract_bundle(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_gzip_checksum_is_refused(job_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "b.tar.gz"
    pack_directory(job_dir, bundle)
    data = bytearray(bundle.read_bytes())
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    bundle.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt"):
        inspect_bundle(bundle)


def _member(name: str, data: bytes) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def test_a_member_hidden_behind_an_invalid_header_is_refused(tmp_path: Path) -> None:
    """Python's tar reader ends the archive silently at an unparsable header after the first
    member; GNU tar skips it and lists what follows. Refused, so that what the worker extracts
    is what every other tool would see."""
    import shutil
    import subprocess

    garbage = b"\xff" * tarfile.BLOCKSIZE  # not a header: its checksum cannot match
    raw = (_member("relaymd.yaml", b"command: 'true'\n") + garbage
           + _member("run.py", b"print('hidden')\n") + b"\0" * tarfile.RECORDSIZE)
    path = tmp_path / "hidden.tar.gz"
    path.write_bytes(gzip.compress(raw, mtime=0))
    with tarfile.open(path) as tar:  # what Python sees: one member, no error
        assert tar.getnames() == ["relaymd.yaml"]
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "-tzf", str(path)], capture_output=True, text=True)
        assert "run.py" in listed.stdout, listed  # what GNU tar sees
    with pytest.raises(BundleError, match="after its end-of-archive block"):
        inspect_bundle(path)
    with pytest.raises(BundleError, match="after its end-of-archive block"):
        extract_bundle(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # Zero padding after the end, as every tar writer leaves, is fine.
    ok = tmp_path / "ok.tar.gz"
    ok.write_bytes(gzip.compress(_member("relaymd.yaml", b"command: 'true'\n")
                                 + b"\0" * (3 * tarfile.RECORDSIZE), mtime=0))
    assert inspect_bundle(ok).members == 1
    if shutil.which("tar"):  # and so is what GNU tar writes
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "relaymd.yaml").write_text("command: 'true'\n")
        (src / "sub" / "x.dat").write_bytes(os.urandom(3000))
        gnu = tmp_path / "gnu.tar.gz"
        subprocess.run(["tar", "-czf", str(gnu), "-C", str(src), "."], check=True)
        assert inspect_bundle(gnu).members == 4  # ./, relaymd.yaml, sub/, sub/x.dat
