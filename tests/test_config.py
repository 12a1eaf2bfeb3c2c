"""OrchestratorSettings loading (defaults < file < environment < flags) and the operator/worker token file."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relaymd.config import ConfigError, OrchestratorSettings, load_settings
from relaymd.server.auth import TokenFileError, load_or_create_tokens

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the developer's own environment and ~/.config/relaymd out of every test."""
    for name in list(os.environ):
        if name.startswith("RELAYMD_") or name in ("XDG_CONFIG_HOME", "XDG_DATA_HOME"):
            monkeypatch.delenv(name)
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def config_file(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(config: Path | None = None, overrides: dict[str, Any] | None = None,
                 environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_settings(config, overrides, environ if environ is not None else {})
    return str(err.value)


# ---------------------------------------------------------------- defaults and precedence


def test_no_file_and_no_environment_gives_the_embedded_default(user_home: Path) -> None:
    s = load_settings(None, None, {})
    home = user_home / ".local" / "share" / "relaymd"
    assert (s.home, s.host, s.port) == (home, "127.0.0.1", 8765)
    assert s.database_path == home / "relaymd.db", s.database_path
    assert s.storage == f"file://{home}/storage", s.storage
    assert (s.tokens_path, s.log_path, s.endpoint_file) == \
        (home / "tokens.json", home / "relaymd.log", home / "orchestrator.json")
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (15, 45)
    assert (s.url, s.token, s.operator_token, s.worker_token) == (None, None, None, None)


def test_readme_configuration_block_lists_the_real_defaults(user_home: Path) -> None:
    block = re.search(r"## Configuration.*?```yaml\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no ```yaml block under ## Configuration"
    documented = yaml.safe_load(block.group(1))
    defaults = load_settings(None, None, {})
    for key, value in documented.items():
        assert key in OrchestratorSettings.model_fields, f"README documents unknown setting {key!r}"
        actual = getattr(defaults, key)
        if key == "home":
            value = Path(value).expanduser()
        assert actual == value, f"README says {key}: {value!r}, the default is {actual!r}"


def test_an_empty_config_file_means_defaults(tmp_path: Path) -> None:
    assert load_settings(config_file(tmp_path, ""), None, {}).port == 8765


def test_file_sets_values_env_beats_file_and_flags_beat_env(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: 9001\nhost: 0.0.0.0\nstorage_url: s3://bucket/relaymd\n"
                                 "heartbeat_interval: 5\nheartbeat_timeout: 20\n")
    s = load_settings(path, None, {})
    assert (s.port, s.host, s.storage, s.heartbeat_interval, s.heartbeat_timeout) == \
        (9001, "0.0.0.0", "s3://bucket/relaymd", 5, 20)

    env = {"RELAYMD_PORT": "9002", "RELAYMD_HEARTBEAT_TIMEOUT": "30"}
    s = load_settings(path, None, env)
    assert (s.port, s.host, s.heartbeat_timeout) == (9002, "0.0.0.0", 30), "env did not beat file"

    s = load_settings(path, {"port": 9003, "host": None}, env)
    assert s.port == 9003, "a command-line flag did not beat the environment"
    assert s.host == "0.0.0.0", "an unset flag (None) overrode the file"
    assert s.heartbeat_timeout == 30, "applying flags dropped the environment's values"


def test_empty_env_value_counts_as_unset(tmp_path: Path) -> None:
    s = load_settings(config_file(tmp_path, "port: 9001\n"), None, {"RELAYMD_PORT": ""})
    assert s.port == 9001


def test_relaymd_home_moves_every_derived_path(tmp_path: Path) -> None:
    home = tmp_path / "data"
    s = load_settings(None, None, {"RELAYMD_HOME": str(home)})
    assert s.home == home
    derived = {"database": s.database_path, "tokens": s.tokens_path, "log": s.log_path,
               "endpoint": s.endpoint_file}
    for what, path in derived.items():
        assert path.parent == home, f"{what} path {path} is not under RELAYMD_HOME {home}"
    assert s.storage == f"file://{home}/storage", s.storage

    pinned = load_settings(config_file(tmp_path, f"database: {tmp_path}/local/relaymd.db\n"),
                           None, {"RELAYMD_HOME": str(home)})
    assert pinned.database_path == tmp_path / "local" / "relaymd.db", "explicit database moved"


def test_tilde_in_home_is_expanded(tmp_path: Path, user_home: Path) -> None:
    s = load_settings(config_file(tmp_path, "home: ~/.local/share/relaymd\n"), None, {})
    assert s.home == user_home / ".local" / "share" / "relaymd", f"home is {s.home!r}"


def test_relaymd_config_in_the_process_environment_is_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAYMD_CONFIG", str(config_file(tmp_path, "port: 9100\n", "elsewhere.yaml")))
    assert load_settings().port == 9100, "RELAYMD_CONFIG file was not read"

    missing = tmp_path / "gone.yaml"
    monkeypatch.setenv("RELAYMD_CONFIG", str(missing))
    with pytest.raises(ConfigError, match=re.escape(str(missing))):
        load_settings()


def test_relaymd_config_in_the_environ_argument_is_used(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: 9100\n", "elsewhere.yaml")
    assert load_settings(None, None, {"RELAYMD_CONFIG": str(path)}).port == 9100


def test_heartbeat_check_applies_to_file_and_environment_combined(tmp_path: Path) -> None:
    path = config_file(tmp_path, "heartbeat_interval: 60\n")
    s = load_settings(path, None, {"RELAYMD_HEARTBEAT_TIMEOUT": "180"})
    assert (s.heartbeat_interval, s.heartbeat_timeout) == (60, 180)


# ---------------------------------------------------------------- errors


def test_explicit_missing_config_file_is_an_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    err = config_error(missing)
    assert str(missing) in err and "not found" in err, err


def test_invalid_yaml_is_an_error(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: [9000\n")
    err = config_error(path)
    assert str(path) in err and "not valid YAML" in err, err


def test_top_level_list_is_an_error(tmp_path: Path) -> None:
    err = config_error(config_file(tmp_path, "- port\n- 9000\n"))
    assert "expected a mapping" in err and "list" in err, err


def test_unknown_key_is_named_as_unknown(tmp_path: Path) -> None:
    err = config_error(config_file(tmp_path, "heartbeat_intervall: 10\n"))
    assert "heartbeat_intervall" in err and "unknown" in err, err


def test_wrong_type_names_the_field_and_the_file(tmp_path: Path) -> None:
    path = config_file(tmp_path, "port: abc\n")
    err = config_error(path)
    assert f"{path}: port:" in err, err


def test_bad_environment_value_names_the_field_and_the_environment() -> None:
    err = config_error(environ={"RELAYMD_HEARTBEAT_TIMEOUT": "soon"})
    assert "heartbeat_timeout" in err and "environment" in err, err


def test_bad_command_line_value_names_the_field() -> None:
    err = config_error(overrides={"port": 70000})
    assert "command line" in err and "port" in err, err


@pytest.mark.parametrize("source", ["file", "environment"])
def test_heartbeat_timeout_must_exceed_interval(tmp_path: Path, source: str) -> None:
    if source == "file":
        err = config_error(config_file(tmp_path, "heartbeat_interval: 30\nheartbeat_timeout: 30\n"))
    else:
        err = config_error(environ={"RELAYMD_HEARTBEAT_INTERVAL": "50"})
    assert "heartbeat_timeout" in err and "longer than" in err and "heartbeat_interval" in err, err


def test_cli_with_missing_config_exits_2_with_one_line(tmp_path: Path, user_home: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAYMD_")}
    result = subprocess.run([sys.executable, "-m", "relaymd", "--config", "/nonexistent/relaymd.yaml",
                             "jobs"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr!r}"
    assert result.stderr == "relaymd: /nonexistent/relaymd.yaml: config file not found " \
        "(given by --config or RELAYMD_CONFIG)\n", result.stderr


def test_several_config_errors_still_make_one_line(tmp_path: Path) -> None:
    err = config_error(config_file(tmp_path, "port: abc\nhost: [1]\n"))
    assert "port" in err and "host" in err, err
    assert "\n" not in err, f"config error spans lines: {err!r}"


# ---------------------------------------------------------------- token file


def make_settings(tmp_path: Path, **kw: Any) -> OrchestratorSettings:
    return OrchestratorSettings(home=tmp_path / "orch", **kw)


def test_tokens_file_is_created_0600_and_stable(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    first = load_or_create_tokens(settings)
    path = settings.tokens_path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} mode {path.stat().st_mode:o}"
    assert json.loads(path.read_text()) == {"operator": first.operator, "worker": first.worker,
                                            "clusters": {}}
    assert first.operator != first.worker and min(len(first.operator), len(first.worker)) >= 32
    assert load_or_create_tokens(settings) == first, "second start changed the tokens"


def test_configured_tokens_win_over_the_file(tmp_path: Path) -> None:
    generated = load_or_create_tokens(make_settings(tmp_path))
    configured = load_or_create_tokens(make_settings(tmp_path, operator_token="op-from-env"))
    assert (configured.operator, configured.worker) == ("op-from-env", generated.worker)
    env = load_settings(None, None, {"RELAYMD_HOME": str(tmp_path / "orch"),
                                     "RELAYMD_WORKER_TOKEN": "wk-from-env"})
    assert load_or_create_tokens(env).worker == "wk-from-env", "RELAYMD_WORKER_TOKEN ignored"


def test_world_readable_tokens_file_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    load_or_create_tokens(settings)
    settings.tokens_path.chmod(0o644)
    with pytest.raises(TokenFileError, match=r"chmod 600"):
        load_or_create_tokens(settings)


def test_corrupt_tokens_file_is_refused(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    settings.home.mkdir()
    settings.tokens_path.write_text("{not json")
    settings.tokens_path.chmod(0o600)
    with pytest.raises(TokenFileError, match=re.escape(str(settings.tokens_path))):
        load_or_create_tokens(settings)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relaymd", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def test_config_check_prints_the_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = config_file(tmp_path, """
port: 9100
s3_secret_access_key: s3-SECRET-value
clusters:
  - name: cloud
    provider: salad
    salad: {organization: o, project: p, container_group: g, api_key: salad-SECRET}
""")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "RELAYMD_WORKER_TOKEN": "worker-SECRET", "RELAYMD_HEARTBEAT_INTERVAL": "20"}
    out = run_cli("config", "check", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert "SECRET" not in out.stdout + out.stderr, "a secret was printed"
    assert out.stdout.startswith(f"# config ok: {path}")
    effective = yaml.safe_load(out.stdout)
    assert (effective["port"], effective["heartbeat_interval"]) == (9100, 20.0)
    assert effective["worker_token"] == effective["s3_secret_access_key"] == "**********"
    assert effective["clusters"][0]["salad"]["api_key"] == "**********"
    assert effective["local_workers"] == 1, "defaults are part of the effective config"
    as_json = json.loads(run_cli("config", "check", str(path), "--json", env=env).stdout)
    assert as_json == json.loads(json.dumps(effective))


def test_config_check_refuses_an_invalid_file_naming_the_field(tmp_path: Path) -> None:
    path = config_file(tmp_path, "clusters:\n  - {name: hpc, provider: slurm, strategy: eager}\n")
    out = run_cli("config", "check", str(path), env={"PATH": os.environ["PATH"],
                                                     "HOME": str(tmp_path)})
    assert out.returncode == 2, out
    assert "config is not valid" in out.stderr and "clusters.0.strategy" in out.stderr, out.stderr


def test_secrets_from_a_file_fill_settings_below_the_environment(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets.yaml"
    secrets.write_text("RELAYMD_WORKER_TOKEN: from-file\nRELAYMD_S3_SECRET_ACCESS_KEY: s3-file\n")
    secrets.chmod(0o600)
    config = config_file(tmp_path, "secrets_provider: file\n")  # default: secrets.yaml beside it
    s = load_settings(config, environ={"RELAYMD_S3_SECRET_ACCESS_KEY": "s3-env"})
    assert s.worker_token is not None and s.worker_token.get_secret_value() == "from-file"
    assert s.s3_secret_access_key is not None
    assert s.s3_secret_access_key.get_secret_value() == "s3-env", "the environment must win"
    secrets.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600") as err:
        load_settings(config, environ={})
    assert "from-file" not in str(err.value)


def test_secrets_from_infisical_with_the_bootstrap_identity(tmp_path: Path) -> None:
    from .infisical_fake import FakeInfisical

    fake = FakeInfisical()
    try:
        fake.add_secrets("proj-1", "prod", {"RELAYMD_SALAD_API_KEY": "salad-from-infisical",
                                            "RELAYMD_WORKER_TOKEN": "wt-from-infisical"},
                         path="/relaymd")
        config = config_file(tmp_path, f"""
secrets_provider: infisical
infisical_site_url: {fake.base_url}
infisical_project_id: proj-1
infisical_path: /relaymd
""")
        env = {"INFISICAL_CLIENT_ID": fake.identity.client_id,
               "INFISICAL_CLIENT_SECRET": fake.identity.client_secret}
        s = load_settings(config, environ=env)
        assert s.salad_api_key is not None
        assert s.salad_api_key.get_secret_value() == "salad-from-infisical"
        assert s.worker_token is not None
        assert s.worker_token.get_secret_value() == "wt-from-infisical"
        with pytest.raises(ConfigError, match="secrets: infisical") as err:
            load_settings(config, environ={**env, "INFISICAL_CLIENT_SECRET": "wrong-secret"})
        assert "wrong-secret" not in str(err.value)
    finally:
        fake.close()


def test_the_orchestrator_log_never_shows_a_configured_secret(tmp_path: Path) -> None:
    import logging

    from relaymd.secrets import RedactSecrets

    from .conftest import RunningOrchestrator, make_settings

    settings = make_settings(tmp_path / "home", worker_token="wt-SECRET-1234567890")
    log_path = tmp_path / "o.log"
    handler = logging.FileHandler(log_path)
    logging.getLogger().addHandler(handler)
    try:
        running = RunningOrchestrator(settings).start()
        try:
            assert any(isinstance(f, RedactSecrets) for f in handler.filters)
            logging.getLogger("relaymd.test").warning("oops, leaked %s", "wt-SECRET-1234567890")
        finally:
            running.stop()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    text = log_path.read_text()
    assert "oops, leaked ****" in text and "wt-SECRET" not in text, text


def test_the_example_config_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    from relaymd.config import (
        ClusterConfig,
        OrchestratorSettings,
        SaladSettings,
        SlurmSettings,
        WorkerSettings,
    )

    path = Path(__file__).resolve().parent.parent / "deploy" / "config.example.yaml"
    example = yaml.safe_load(path.read_text())
    fields = set(OrchestratorSettings.model_fields) | set(WorkerSettings.model_fields)
    assert set(example) == fields, \
        f"missing: {fields - set(example)}, unknown: {set(example) - fields}"
    for role in (OrchestratorSettings, WorkerSettings):
        defaults = role(home=Path("~/.local/share/relaymd")).model_dump(mode="json")
        for name, value in example.items():
            if name in ("home", "clusters") or name not in defaults:
                continue
            assert value == defaults[name], \
                f"{role.__name__}.{name}: example says {value!r}, default is {defaults[name]!r}"
    slurm, salad = example["clusters"]
    for section, model in ((slurm, ClusterConfig), (salad, ClusterConfig),
                           (slurm["slurm"], SlurmSettings), (salad["salad"], SaladSettings)):
        names = set(model.model_fields)
        assert set(section) == names, (model.__name__, set(section) ^ names)
    for key, value in slurm["slurm"].items():
        default = SlurmSettings.model_fields[key].get_default(call_default_factory=True)
        assert value == default, f"slurm.{key}: example {value!r}, default {default!r}"
    # The file as a whole is a valid configuration.
    copy = config_file(tmp_path, path.read_text())
    settings = load_settings(copy, environ={})
    assert [c.name for c in settings.clusters] == ["bigiron", "salad"]


# ---------------------------------------------------------------- settings by role

SHARED = """\
port: 9001
operator_token: op-file-token-123456
clusters:
  - name: bigiron
    provider: slurm
worker_idle: poll_then_exit
handoff_margin: 120
storage_url: file:///srv/relaymd
"""


def test_a_worker_reads_a_shared_config_file_without_the_orchestrators_settings(
        tmp_path: Path) -> None:
    from relaymd.config import OrchestratorSettings, WorkerSettings
    path = config_file(tmp_path, SHARED)
    env = {"RELAYMD_OPERATOR_TOKEN": "op-env-token-7890", "RELAYMD_SALAD_API_KEY": "salad-k-1234",
           "RELAYMD_MIN_SEGMENT": "60"}
    worker = load_settings(path, None, env, role=WorkerSettings)
    assert type(worker) is WorkerSettings
    assert (worker.worker_idle, worker.handoff_margin, worker.min_segment, worker.storage) == \
        ("poll_then_exit", 120, 60, "file:///srv/relaymd")
    for name in ("operator_token", "clusters", "salad_api_key", "database", "token"):
        assert not hasattr(worker, name), f"a worker holds the orchestrator's {name}"
    held = worker.secret_values()
    assert not {"op-file-token-123456", "op-env-token-7890", "salad-k-1234"} & set(held), held

    orch = load_settings(path, None, env)
    assert type(orch) is OrchestratorSettings
    assert orch.port == 9001 and [c.name for c in orch.clusters] == ["bigiron"]
    assert orch.operator_token is not None and \
        orch.operator_token.get_secret_value() == "op-env-token-7890"
    assert not hasattr(orch, "handoff_margin"), "the orchestrator holds a worker-only setting"


def test_a_key_no_role_knows_is_refused_by_either(tmp_path: Path) -> None:
    from relaymd.config import WorkerSettings
    path = config_file(tmp_path, SHARED + "hand_off_margin: 5\n")
    for role in ("orchestrator", "worker"):
        with pytest.raises(ConfigError, match="hand_off_margin: unknown setting"):
            if role == "worker":
                load_settings(path, None, {}, role=WorkerSettings)
            else:
                load_settings(path, None, {})


def test_a_bad_value_for_the_other_role_does_not_stop_this_one(tmp_path: Path) -> None:
    """A worker does not validate the orchestrator's keys (nor the other way round): a typo in
    a cluster does not keep the workers of a shared login-node config from starting."""
    from relaymd.config import WorkerSettings
    path = config_file(tmp_path, "clusters: [{name: x, provider: nonsense}]\nhandoff_margin: 7\n")
    assert load_settings(path, None, {}, role=WorkerSettings).handoff_margin == 7
    assert "clusters.0.provider" in config_error(path)
