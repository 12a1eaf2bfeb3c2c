"""The worker and orchestrator images for real, and the deploy templates that start them.

The container tests run under `make test-images`, which builds the images first (deploy/images.sh:
podman on a Debian base made here, plain `openmm` instead of the CUDA extra) and sets
RELAYMD_TEST_IMAGES=1. An orchestrator runs in this process with S3 storage on a loopback moto
server (a container user cannot write into the host's file:// storage); workers run in the image
with podman on the host network. A real OpenMM job (the `relaymd example openmm` bundle) runs to
completion in one container; a second is handed back by `podman stop` (SIGTERM, as SLURM, Docker
and Salad send it) with a last checkpoint and finished by a fresh container from there. The
images run as uid 1000, hold no token and carry this tree's version; the orchestrator image
serves and passes its HEALTHCHECK. Without a usable podman they are skipped, saying why; in CI
(CI=true) that is a failure.

The template tests run everywhere: the Salad container group and the SLURM job script start the
worker image with the command, user and environment it expects (read from the built image where
it exists, from the Dockerfile otherwise).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import relaymd
from relaymd.config import ClusterConfig, WorkerSettings, load_settings
from relaymd.models import JobCreate, JobDetail
from relaymd.storage.bundle import pack_directory

from .conftest import RunningOrchestrator, free_port, make_settings, s3_settings
from .test_deploy_files import SALAD_GROUP, assignments, dockerfile, exec_form

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "build" / "containers"  # deploy/images.sh: store, configuration, `env`
SBATCH_TEMPLATE = ROOT / "relaymd" / "server" / "provisioning" / "job.sbatch"
WORKER_ENTRYPOINT = ["relaymd", "worker"]
IMAGE_USER = "1000"


def images_env() -> dict[str, str]:
    """What deploy/images.sh wrote: the podman configuration and the image names."""
    try:
        lines = (STATE / "env").read_text().splitlines()
    except FileNotFoundError:
        return {}
    return dict(line.split("=", 1) for line in lines if "=" in line)


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with the project's podman configuration and store (CONTAINERS_CONF,
    CONTAINERS_STORAGE_CONF) and `extra`."""
    conf = {k: v for k, v in images_env().items() if k.startswith("CONTAINERS_")}
    return {**os.environ, **conf, **(extra or {})}


def podman(*args: str, timeout: float = 120, check: bool = True,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout,
                            env=podman_env(env))
    if check:
        assert result.returncode == 0, \
            f"podman {' '.join(args[:3])} ... exited {result.returncode}: {result.stderr[-800:]}"
    return result


# --------------------------------------------------------------------------- the image's contract


def image_contract(kind: str = "worker") -> dict[str, Any]:
    """Entrypoint, user, RELAYMD_* environment, workdir and stop signal of the image: the built
    one's (podman image inspect) where it exists, else what its Dockerfile says."""
    name = images_env().get(f"{kind.upper()}_IMAGE")
    if name and shutil.which("podman"):
        found = podman("image", "inspect", name, check=False, timeout=30)
        if found.returncode == 0:
            config = json.loads(found.stdout)[0]["Config"]
            env = dict(e.split("=", 1) for e in config.get("Env") or [])
            return {"source": f"image {name}", "entrypoint": config.get("Entrypoint"),
                    "cmd": config.get("Cmd"), "user": config.get("User", ""),
                    "env": {k: v for k, v in env.items() if k.startswith("RELAYMD_")},
                    "workdir": config.get("WorkingDir"), "stopsignal": config.get("StopSignal")}
    _, instructions = dockerfile(kind)

    def last(keyword: str) -> str | None:
        return next((i.args for i in reversed(instructions) if i.keyword == keyword), None)

    cmd = last("CMD")
    return {"source": f"Dockerfile.{kind}", "entrypoint": exec_form(last("ENTRYPOINT") or "[]"),
            "cmd": exec_form(cmd) if cmd else None, "user": last("USER") or "",
            "env": {k: v for i in instructions if i.keyword == "ENV"
                    for k, v in assignments(i).items() if k.startswith("RELAYMD_")},
            "workdir": last("WORKDIR"), "stopsignal": last("STOPSIGNAL")}


WORKER_ENV = {"RELAYMD_" + name.upper() for name in WorkerSettings.model_fields}
NEEDED = {"RELAYMD_URL", "RELAYMD_WORKER_TOKEN", "RELAYMD_STORAGE_URL"}


def test_the_worker_image_runs_relaymd_worker_as_uid_1000_in_its_job_directory() -> None:
    image = image_contract()
    where = image["source"]
    assert image["entrypoint"] == WORKER_ENTRYPOINT, f"{where}: entrypoint {image['entrypoint']}"
    assert not image["cmd"], f"{where}: a CMD would add arguments to `relaymd worker`"
    assert image["user"].split(":")[0] == IMAGE_USER, f"{where}: user {image['user']!r}"
    assert image["stopsignal"] == "SIGTERM", where
    assert image["env"].get("RELAYMD_WORKER_WORKDIR", "").startswith(image["workdir"] + "/"), \
        f"{where}: job directories {image['env']} outside the workdir {image['workdir']}"
    assert set(image["env"]) <= WORKER_ENV, f"{where}: sets what the worker never reads"


def test_salad_group_starts_the_worker_image_as_it_is_built(tmp_path: Path) -> None:
    """The group runs the image's own entrypoint and user (it overrides neither) and sets only
    RELAYMD_* variables the worker reads, the ones it needs among them; together with the
    image's own they load as the worker's settings."""
    image = image_contract()
    body = json.loads(SALAD_GROUP.read_text())
    container = body["container"]
    assert container["image"].rsplit("/", 1)[-1].split(":")[0] == "relaymd-worker"
    assert "command" not in container, \
        f"the group overrides the image's entrypoint {image['entrypoint']} ({image['source']})"
    assert not {"user", "security_context", "run_as"} & set(container), "a user override"
    env = container["environment_variables"]
    assert set(env) <= WORKER_ENV, f"not worker settings: {sorted(set(env) - WORKER_ENV)}"
    assert set(env) >= NEEDED, f"the worker needs {sorted(NEEDED - set(env))}"
    assert "RELAYMD_WORKER_WORKDIR" not in env, \
        "the image's job directory (owned by its user) is the one to use"
    filled = {k: re.sub(r"\$\{\w+\}", "placeholder", v) for k, v in env.items()}
    settings = load_settings(environ={**image["env"], **filled, "HOME": str(tmp_path),
                                      "XDG_CONFIG_HOME": str(tmp_path / "none")},
                             role=WorkerSettings)
    assert str(settings.worker_workdir) == image["env"]["RELAYMD_WORKER_WORKDIR"]
    assert settings.worker_idle == "poll_then_exit"


def test_the_sbatch_template_execs_relaymd_worker_inside_the_image(tmp_path: Path) -> None:
    """The job script ends by exec'ing `apptainer exec --nv IMAGE` + the image's entrypoint,
    warns with the image's stop signal, and exports (by name) only what the worker reads."""
    from relaymd.server.provisioning.slurm import SlurmProvider

    image = image_contract()
    sif = "/shared/images/relaymd-worker.sif"
    cluster = ClusterConfig.model_validate({
        "name": "hpc", "provider": "slurm", "max_pending": 1, "max_workers": 2,
        "slurm": {"image": sif, "gpus": 1, "signal_margin": 300}})
    settings = make_settings(tmp_path / "home", storage_url="s3://bucket/relaymd",
                             s3_endpoint_url="https://s3.example.org", s3_access_key_id="id",
                             s3_secret_access_key="s3-secret-value")
    token = "bootstrap-" + uuid.uuid4().hex
    provider = SlurmProvider(cluster, settings, None, "http://login1:8765", token)  # type: ignore[arg-type]
    env = provider.worker_env()
    script = provider.script(["PATH", "HOME", "USER", *env])
    assert SBATCH_TEMPLATE.read_text().rstrip().endswith("exec {{worker_command}}")
    commands = [line for line in script.splitlines() if line.strip() and not line.startswith("#")]
    argv = shlex.split(commands[-1])
    assert argv[:5] == ["exec", "apptainer", "exec", "--nv", sif], commands[-1]
    assert argv[5:] == image["entrypoint"], \
        f"the job runs {argv[5:]}, the image's entrypoint is {image['entrypoint']} ({image['source']})"
    signal = re.search(r"^#SBATCH --signal=B:(\w+)@\d+$", script, re.MULTILINE)
    assert signal and "SIG" + signal.group(1) == image["stopsignal"], (signal, image["stopsignal"])
    exported = re.search(r"^#SBATCH --export=(\S+)$", script, re.MULTILINE)
    assert exported, script
    names = exported.group(1).split(",")
    relaymd_names = {n for n in names if n.startswith("RELAYMD_")}
    assert set(names) - relaymd_names == {"PATH", "HOME", "USER"}
    assert relaymd_names <= WORKER_ENV, sorted(relaymd_names - WORKER_ENV)
    assert relaymd_names >= NEEDED and relaymd_names == set(env)
    assert token not in script and "s3-secret-value" not in script, "a secret in the job script"


# --------------------------------------------------------------------------- containers, for real

needs_images = pytest.mark.skipif(
    not os.environ.get("RELAYMD_TEST_IMAGES"),
    reason="container tests run under `make test-images` (it builds the images with podman "
           "first and sets RELAYMD_TEST_IMAGES=1)")


def unusable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI=true: the container tests must run in CI)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """The image names, once podman is known to run them here."""
    if shutil.which("podman") is None:
        unusable("podman is not installed (`make test-images` installs it when run as root)")
    env = images_env()
    if not env:
        unusable(f"no {STATE / 'env'}: build the images first (make images)")
    if env.get("IMAGE_TOOL") != "podman":
        unusable(f"the images were built with {env.get('IMAGE_TOOL')}; these tests run podman")
    for key in ("WORKER_IMAGE", "ORCHESTRATOR_IMAGE"):
        if podman("image", "exists", env[key], check=False).returncode != 0:
            unusable(f"image {env[key]} is missing: make images")
    probe = podman("run", "--rm", "--network", "host", "--entrypoint", "true", env["WORKER_IMAGE"],
                   check=False, timeout=60)
    if probe.returncode != 0:
        unusable(f"podman cannot run a container here: {probe.stderr.strip()[-400:]}")
    return env


class Containers:
    """Containers a test starts (removed after it), with their logs for failure messages."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def run(self, image: str, env: dict[str, str]) -> str:
        """Start a container of `image` on the host network, detached; `env` goes in by name only
        (`-e NAME`), so no value shows in a command line."""
        name = f"relaymd-test-{uuid.uuid4().hex[:10]}"
        self.names.append(name)
        names = [flag for key in env for flag in ("-e", key)]
        podman("run", "-d", "--name", name, "--network", "host", *names, image, env=env)
        return name

    def logs(self, name: str, lines: int = 6) -> str:
        out = podman("logs", name, check=False, timeout=30)
        text = (out.stdout + out.stderr).strip().splitlines()
        return f"container {name}: " + " | ".join(text[-lines:])

    def wait(self, name: str, timeout: float) -> int:
        try:
            out = podman("wait", name, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} still running after {timeout:g}s ({self.logs(name)})") \
                from None
        return int(out.stdout.strip().splitlines()[-1])

    def exit_code(self, name: str) -> int:
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip())

    def remove_all(self) -> None:
        for name in self.names:
            podman("rm", "-f", "-v", "--time", "0", name, check=False, timeout=60)


@pytest.fixture
def containers(images: dict[str, str]) -> Iterator[Containers]:
    running = Containers()
    yield running
    running.remove_all()


@pytest.fixture
def orch(images: dict[str, str], moto_server: Any, tmp_path: Path) -> Iterator[RunningOrchestrator]:
    settings = s3_settings(moto_server, tmp_path / "home", heartbeat_interval=1.0,
                           heartbeat_timeout=10.0)
    settings.reap_interval = 1.0
    running = RunningOrchestrator(settings).start()
    yield running
    running.stop()


def worker_env(orch: RunningOrchestrator, **extra: str) -> dict[str, str]:
    """What a worker container gets: the orchestrator's URL (the host network is shared), the
    local cluster's bootstrap token, the storage and its keys."""
    return {"RELAYMD_URL": orch.url, "RELAYMD_WORKER_TOKEN": orch.bootstrap_token(),
            **orch.settings.storage_env(), "RELAYMD_WORKER_IDLE": "immediate_exit", **extra}


def submit_example(orch: RunningOrchestrator, tmp_path: Path, ns: float,
                   checkpoint_seconds: int) -> str:
    """`relaymd example openmm` (a ~700-atom water box on the CPU platform), with a shorter
    checkpoint interval, packed and submitted; returns the job id."""
    src = tmp_path / f"example-{uuid.uuid4().hex[:6]}"
    made = subprocess.run([sys.executable, "-m", "relaymd", "example", "openmm", str(src),
                           "--atoms", "700", "--ns", f"{ns:g}", "--platform", "CPU"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    spec = yaml.safe_load((src / "relaymd.yaml").read_text())
    spec["command"] = re.sub(r"--checkpoint-seconds \S+", f"--checkpoint-seconds {checkpoint_seconds}",
                             spec["command"])
    (src / "relaymd.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    job_id = uuid.uuid4().hex
    bundle = tmp_path / f"{job_id}.tar.gz"
    pack_directory(src, bundle)
    op = orch.operator()
    op.upload_bundle(job_id, bundle)
    op.create_job(JobCreate(id=job_id, title="openmm in a container"))
    return job_id


def checkpoint_step(orch: RunningOrchestrator, detail: JobDetail, tmp_path: Path,
                    seq: int | None = None) -> int:
    """The MD step of an accepted checkpoint (its checkpoint.json), default the latest."""
    seq = detail.latest_checkpoint if seq is None else seq
    info = next(c for c in detail.checkpoint_list if c.seq == seq)
    dest = tmp_path / f"ckpt-{uuid.uuid4().hex[:8]}.tar.gz"
    orch.settings.open_storage().get_file(info.key, dest, expected_sha256=info.sha256)
    with tarfile.open(dest) as tar:
        member = tar.extractfile("checkpoint.json")
        assert member is not None, f"checkpoint {seq} has no checkpoint.json"
        return int(json.load(member)["step"])


def engine_log(orch: RunningOrchestrator, job_id: str, attempt: int) -> str:
    import gzip

    key = f"jobs/{job_id}/logs/attempt-{attempt}.log.gz"
    return gzip.decompress(orch.settings.open_storage().get_bytes(key)).decode()


def wait_for(predicate: Any, timeout: float, what: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g}s waiting for "
                         f"{what() if callable(what) else what}")


PROOF = f'__version__ = "{relaymd.__version__}"'.encode()  # relaymd/__init__.py, in every image


def token_in_files(container: str, token: str) -> bool:
    """Whether `token` occurs anywhere in the container's files (`podman export`: the image's
    layers and what the container wrote, as one plain tar stream)."""
    found = stream_contains(["podman", "export", container], [token.encode(), PROOF])
    assert found[PROOF], f"the export of {container} does not show relaymd/__init__.py: no check"
    return found[token.encode()]


def token_in_image_config(image: str, token: str) -> bool:
    """Whether `token` is in the image's configuration (environment, labels, ...) or history (the
    build steps and their arguments)."""
    config = podman("image", "inspect", image).stdout
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "pip install" in history, "podman history shows no build steps: no check"
    return token in config or token in history


def stream_contains(argv: list[str], needles: list[bytes]) -> dict[bytes, bool]:
    """Which of `needles` occur in the output of `argv` (a tar stream), read in chunks."""
    found = dict.fromkeys(needles, False)
    keep = max(len(n) for n in needles)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=podman_env())
    assert proc.stdout is not None
    tail = b""
    total = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
        window = tail + chunk
        for needle in needles:
            found[needle] = found[needle] or needle in window
        tail = window[-keep:]
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert proc.wait(300) == 0, f"{' '.join(argv[:3])} failed: {err[-400:]}"
    assert total > 1 << 20, f"{' '.join(argv[:3])} wrote only {total} bytes"
    return found


@needs_images
def test_an_openmm_job_runs_in_the_worker_image_and_a_sigterm_hand_off_resumes_in_a_fresh_one(
        images: dict[str, str], orch: RunningOrchestrator, containers: Containers,
        tmp_path: Path) -> None:
    image = images["WORKER_IMAGE"]
    op = orch.operator()
    env = worker_env(orch)
    token = env["RELAYMD_WORKER_TOKEN"]
    version = podman("run", "--rm", "--entrypoint", "relaymd", image, "--version").stdout
    assert version.split()[-1] == relaymd.__version__, f"the image says {version.strip()!r}"
    uid = podman("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip()
    assert uid == IMAGE_USER, f"the image runs as uid {uid}"

    # 1. A short job, start to finish in one container, which then exits by itself (0).
    short = submit_example(orch, tmp_path, ns=0.004, checkpoint_seconds=30)
    first = containers.run(image, env=env)
    code = containers.wait(first, timeout=240)
    d = op.get_job(short)
    assert (code, d.status) == (0, "completed"), \
        f"exit {code}, job {d.status} {d.last_failure or ''} ({containers.logs(first)})"
    assert checkpoint_step(orch, d, tmp_path) == 2000, "the final checkpoint is not at the end"
    assert "finished 2000 steps" in engine_log(orch, short, 1)
    # The bootstrap token it ran with is in neither the image nor anything the worker wrote.
    assert not token_in_image_config(image, token), "the bootstrap token is in the image's config"
    assert not token_in_files(first, token), "the bootstrap token is in the container's files"

    # 2. A longer job: `podman stop` (SIGTERM) hands it back with a last checkpoint ...
    long = submit_example(orch, tmp_path, ns=0.03, checkpoint_seconds=2)  # 15,000 steps
    second = containers.run(image, env=env)
    before = wait_for(lambda: (d := op.get_job(long)).latest_checkpoint and d, 120,
                      lambda: f"a first checkpoint ({containers.logs(second)})")
    assert before.status == "running", before.status
    step_before = checkpoint_step(orch, before, tmp_path)
    signalled = time.monotonic()
    podman("stop", "--time", "120", second, timeout=150)
    took = time.monotonic() - signalled
    assert containers.exit_code(second) == 0, f"exit after SIGTERM ({containers.logs(second)})"
    # The engine checkpoints within a second of SIGTERM; the worker must not wait out its
    # shutdown_wait (90 s) for it. (As PID 1 without an init, as under Salad, the engine its
    # `sh -c` leaves behind is the worker's to reap: a zombie it waits on looks alive.)
    logs = podman("logs", second)
    worker_said = logs.stdout + logs.stderr
    assert "ignored SIGTERM" not in worker_said and took < 30, \
        f"the hand-off took {took:.0f}s after SIGTERM ({containers.logs(second)})"
    d = op.get_job(long)
    release = [e for e in d.events if e.kind == "release"]
    assert d.status == "queued" and len(release) == 1 and d.failures == 0, \
        f"{d.status}, events {[e.kind for e in d.events]}, failures {d.failures}"
    assert release[0].seq is not None and release[0].seq > (before.latest_checkpoint or 0), \
        f"the release carried checkpoint {release[0].seq}, not one newer than {before.latest_checkpoint}"
    handed = checkpoint_step(orch, d, tmp_path, seq=release[0].seq)
    assert step_before < handed < 15000, f"hand-off checkpoint at step {handed}, before {step_before}"
    assert f"SIGTERM: checkpoint written at step {handed}" in engine_log(orch, long, 1), \
        "the engine's last checkpoint is not the hand-off's"

    # ... and a fresh container resumes it from there and completes it.
    third = containers.run(image, env=env)
    code = containers.wait(third, timeout=300)
    d = op.get_job(long)
    assert (code, d.status, d.attempt, d.failures) == (0, "completed", 2, 0), \
        f"exit {code}, job {d.status} attempt {d.attempt} ({containers.logs(third)})"
    log2 = engine_log(orch, long, 2)
    assert f"resumed at step {handed}" in log2, f"attempt 2 did not resume at {handed}: {log2[-400:]}"
    assert "finished 15000 steps" in log2, log2[-400:]
    assert checkpoint_step(orch, d, tmp_path) == 15000


@needs_images
def test_the_orchestrator_image_serves_as_uid_1000_passes_its_healthcheck_and_stops_on_sigterm(
        images: dict[str, str], containers: Containers) -> None:
    port = free_port()
    token = "relaymd-test-token-" + uuid.uuid4().hex
    env = {"RELAYMD_HOST": "127.0.0.1", "RELAYMD_PORT": str(port), "RELAYMD_WORKER_TOKEN": token}
    image = images["ORCHESTRATOR_IMAGE"]
    name = containers.run(image, env=env)
    wait_for(lambda: _healthy(port), 90, lambda: f"/healthz ({containers.logs(name)})")
    health = podman("healthcheck", "run", name, check=False, timeout=60)
    assert health.returncode == 0, f"HEALTHCHECK: {health.stdout} {health.stderr}"
    assert podman("exec", name, "id", "-u").stdout.strip() == IMAGE_USER
    version = podman("exec", name, "relaymd", "--version").stdout
    assert version.split()[-1] == relaymd.__version__, version
    podman("stop", "--time", "60", name, timeout=90)
    assert containers.exit_code(name) == 0, f"exit after SIGTERM ({containers.logs(name)})"
    # The token it ran with is in neither the image nor the container's files (its tokens file
    # is in the /data volume, which is the deployment's, not the image's).
    assert not token_in_image_config(image, token), "the token is in the image's config"
    assert not token_in_files(name, token), "the token is in the container's files"


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
