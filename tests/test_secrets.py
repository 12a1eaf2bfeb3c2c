"""Secrets providers (relaymd.secrets): the environment, a 0600 file, and Infisical over real HTTP
(tests/infisical_fake.py on loopback), plus the log filter that masks secret values.

Every secret value here is random and distinctive, so "it does not appear" checks mean something.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path

import httpx
import pytest

from relaymd.secrets import (
    SECRET_NAMES,
    SETTING_SECRETS,
    EnvSecrets,
    FileSecrets,
    InfisicalSecrets,
    RedactSecrets,
    SecretsError,
    SecretsProvider,
    mask,
    open_secrets,
    settings_from_secrets,
)
from tests.infisical_fake import LIST_V3, LIST_V4, LOGIN, FakeInfisical

PROJECT = "6f1c2d3e-aaaa-4bbb-8ccc-0123456789ab"


def _value(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# -- env ------------------------------------------------------------------------------------------


def test_env_provider_picks_only_known_non_empty_relaymd_secrets() -> None:
    worker, s3 = _value("wt"), _value("s3")
    environ = {
        "RELAYMD_WORKER_TOKEN": worker,
        "RELAYMD_S3_SECRET_ACCESS_KEY": s3,
        "RELAYMD_TOKEN": "",  # empty: not set
        "RELAYMD_HOME": "/srv/relaymd",  # a setting, not a secret
        "RELAYMD_SOMETHING_TOKEN": _value("x"),  # looks like one, is not known
        "AWS_SECRET_ACCESS_KEY": _value("aws"),  # boto3 reads these itself
        "PATH": "/usr/bin",
    }
    provider = EnvSecrets(environ)
    assert isinstance(provider, SecretsProvider) and provider.name == "env"
    assert provider.fetch() == {"RELAYMD_WORKER_TOKEN": worker, "RELAYMD_S3_SECRET_ACCESS_KEY": s3}
    assert worker not in repr(provider)


def test_secret_names_and_setting_names_line_up() -> None:
    relaymd = {n for n in SECRET_NAMES if n.startswith("RELAYMD_")}
    assert {n[len("RELAYMD_"):].lower() for n in relaymd} == set(SETTING_SECRETS)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= SECRET_NAMES


def test_settings_from_secrets_maps_names_and_ignores_unknown() -> None:
    got = settings_from_secrets({
        "RELAYMD_S3_SECRET_ACCESS_KEY": "s3-secret",
        "RELAYMD_S3_ACCESS_KEY_ID": "s3-id",
        "RELAYMD_WORKER_TOKEN": "wt",
        "RELAYMD_TAILSCALE_AUTH_KEY": "ts",
        "salad_api_key": "salad",  # the setting name itself
        "RELAYMD_HOME": "/srv",  # a RELAYMD_ name that is not a secret setting
        "DATABASE_URL": "postgres://",  # someone else's secret
        "AWS_ACCESS_KEY_ID": "aws-id",  # RELAYMD_ ones win
        "AWS_SECRET_ACCESS_KEY": "aws-secret",
        "RELAYMD_OPERATOR_TOKEN": "",  # empty: not set
    })
    assert got == {"s3_secret_access_key": "s3-secret", "s3_access_key_id": "s3-id", "worker_token": "wt",
                   "tailscale_auth_key": "ts", "salad_api_key": "salad"}


def test_settings_from_secrets_env_style_name_wins_over_field_name() -> None:
    assert settings_from_secrets({"RELAYMD_TOKEN": "a", "token": "b"}) == {"token": "a"}
    assert settings_from_secrets({"token": "b", "RELAYMD_TOKEN": "a"}) == {"token": "a"}


def test_settings_from_secrets_aws_fallback_only_as_a_whole_pair() -> None:
    aws = {"AWS_ACCESS_KEY_ID": "aws-id", "AWS_SECRET_ACCESS_KEY": "aws-secret"}
    assert settings_from_secrets(aws) == {"s3_access_key_id": "aws-id", "s3_secret_access_key": "aws-secret"}
    # Half of the pair under a RelayMD name: the AWS pair must not fill the other half.
    assert settings_from_secrets({**aws, "RELAYMD_S3_ACCESS_KEY_ID": "rid"}) == {"s3_access_key_id": "rid"}
    assert settings_from_secrets({**aws, "s3_secret_access_key": "rs"}) == {"s3_secret_access_key": "rs"}


def test_mask_never_reveals_anything() -> None:
    assert mask(None) == "" and mask("") == ""
    assert mask("x") == mask("a-very-long-secret-value") == "****"


def test_open_secrets_unknown_kind_lists_the_choices() -> None:
    with pytest.raises(SecretsError) as exc:
        open_secrets("vault", environ={})
    assert "vault" in str(exc.value)
    for choice in ("env", "file", "infisical"):
        assert choice in str(exc.value)


def test_open_secrets_builds_each_provider(tmp_path: Path) -> None:
    assert isinstance(open_secrets("env", environ={}), EnvSecrets)
    assert isinstance(open_secrets("file", environ={}, file=tmp_path / "s.yaml"), FileSecrets)
    with pytest.raises(SecretsError, match="file"):
        open_secrets("file", environ={})
    client_secret = _value("cs")
    provider = open_secrets("infisical", environ={"INFISICAL_CLIENT_ID": "cid",
                                                  "INFISICAL_CLIENT_SECRET": client_secret},
                            infisical={"project_id": PROJECT, "environment": "staging", "path": "/relaymd/"})
    assert isinstance(provider, InfisicalSecrets)
    assert (provider.site_url, provider.client_id, provider.project_id, provider.environment, provider.path) \
        == ("https://app.infisical.com", "cid", PROJECT, "staging", "/relaymd")
    assert client_secret not in repr(provider) and client_secret not in str(vars(provider))


def test_open_secrets_infisical_without_bootstrap_credentials_names_both_variables() -> None:
    for environ in ({}, {"INFISICAL_CLIENT_ID": "cid"}, {"INFISICAL_CLIENT_SECRET": "cs"}):
        with pytest.raises(SecretsError) as exc:
            open_secrets("infisical", environ=environ, infisical={"project_id": PROJECT})
        assert "INFISICAL_CLIENT_ID" in str(exc.value) and "INFISICAL_CLIENT_SECRET" in str(exc.value)
    with pytest.raises(SecretsError, match="project_id"):
        open_secrets("infisical", environ={"INFISICAL_CLIENT_ID": "c", "INFISICAL_CLIENT_SECRET": "s"})
    with pytest.raises(SecretsError, match="projectid"):  # a typo in the config is named
        open_secrets("infisical", environ={"INFISICAL_CLIENT_ID": "c", "INFISICAL_CLIENT_SECRET": "s"},
                     infisical={"project_id": PROJECT, "projectid": PROJECT})


# -- file -----------------------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_file_provider_reads_private_yaml(tmp_path: Path) -> None:
    token = _value("wt")
    path = _write(tmp_path / "secrets.yaml", f"""
# RelayMD secrets
RELAYMD_WORKER_TOKEN: {token}
RELAYMD_SALAD_API_KEY: 0123      # digits stay as written (YAML 1.1 would read octal 83)
RELAYMD_TAILSCALE_AUTH_KEY: 42
RELAYMD_TOKEN:                   # empty: not set
RELAYMD_OPERATOR_TOKEN: "quoted: with colon"
""")
    provider = FileSecrets(path)
    assert isinstance(provider, SecretsProvider) and provider.name == "file"
    assert provider.fetch() == {"RELAYMD_WORKER_TOKEN": token, "RELAYMD_SALAD_API_KEY": "0123",
                                "RELAYMD_TAILSCALE_AUTH_KEY": "42",
                                "RELAYMD_OPERATOR_TOKEN": "quoted: with colon"}


def test_file_provider_reads_private_json(tmp_path: Path) -> None:
    token = _value("s3")
    path = _write(tmp_path / "secrets.json", json.dumps({"RELAYMD_S3_SECRET_ACCESS_KEY": token,
                                                         "RELAYMD_S3_ACCESS_KEY_ID": 12345}))
    assert FileSecrets(path).fetch() == {"RELAYMD_S3_SECRET_ACCESS_KEY": token,
                                         "RELAYMD_S3_ACCESS_KEY_ID": "12345"}


def test_file_provider_refuses_a_file_others_can_read(tmp_path: Path) -> None:
    token = _value("wt")
    path = _write(tmp_path / "secrets.yaml", f"RELAYMD_WORKER_TOKEN: {token}\n", mode=0o644)
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    message = str(exc.value)
    assert str(path) in message and "0644" in message and f"chmod 600 {path}" in message
    assert token not in message
    os.chmod(path, 0o640)  # group-readable is refused too
    with pytest.raises(SecretsError, match="0640"):
        FileSecrets(path).fetch()


def test_file_provider_missing_file_says_how_to_create_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    assert str(path) in str(exc.value) and "does not exist" in str(exc.value)
    assert "600" in str(exc.value)


@pytest.mark.parametrize("text, what", [
    ("- RELAYMD_WORKER_TOKEN\n- abc\n", "list"),
    ("just-a-line-of-text\n", "string"),
    ("", "empty"),
])
def test_file_provider_refuses_what_is_not_a_mapping(tmp_path: Path, text: str, what: str) -> None:
    path = _write(tmp_path / "secrets.yaml", text)
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    assert what in str(exc.value) and str(path) in str(exc.value)
    if text:
        assert "abc" not in str(exc.value) and "just-a-line" not in str(exc.value)


def test_file_provider_refuses_a_name_given_twice(tmp_path: Path) -> None:
    first, second = _value("one"), _value("two")
    path = _write(tmp_path / "secrets.yaml", f"RELAYMD_TOKEN: {first}\nRELAYMD_TOKEN: {second}\n")
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    assert "RELAYMD_TOKEN is given twice" in str(exc.value) and "line 2" in str(exc.value)
    assert first not in str(exc.value) and second not in str(exc.value)
    # A YAML merge may override on purpose.
    _write(path, "base: &b {RELAYMD_TOKEN: a}\nthis:\n  <<: *b\n  RELAYMD_TOKEN: b\n")
    with pytest.raises(SecretsError, match="mapping"):  # nested: refused, but not as a duplicate
        FileSecrets(path).fetch()


def test_file_provider_refuses_non_scalar_values(tmp_path: Path) -> None:
    inner = _value("nested")
    path = _write(tmp_path / "secrets.yaml", f"RELAYMD_WORKER_TOKEN:\n  value: {inner}\n")
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    assert "RELAYMD_WORKER_TOKEN" in str(exc.value) and "mapping" in str(exc.value)
    assert inner not in str(exc.value)


@pytest.mark.parametrize("bad_line", [
    'RELAYMD_WORKER_TOKEN: "{secret}',  # unterminated quote
    "RELAYMD_WORKER_TOKEN: {secret}: extra",  # mapping values not allowed here
    "RELAYMD_WORKER_TOKEN: [{secret}",  # unterminated flow sequence
    "\tRELAYMD_WORKER_TOKEN: {secret}",  # a tab where YAML wants spaces
])
def test_file_provider_yaml_error_does_not_echo_the_file(tmp_path: Path, bad_line: str) -> None:
    secret = _value("leak")
    path = _write(tmp_path / "secrets.yaml",
                  f"RELAYMD_TOKEN: fine\n{bad_line.format(secret=secret)}\nRELAYMD_SALAD_API_KEY: x\n")
    with pytest.raises(SecretsError) as exc:
        FileSecrets(path).fetch()
    message = str(exc.value)
    assert "line" in message and str(path) in message
    assert secret not in message and secret[:8] not in message and "leak" not in message
    assert "RELAYMD_WORKER_TOKEN" not in message  # nothing of the bad line at all
    # The YAMLError (whose text quotes the line) is not chained, so no traceback shows it either.
    assert exc.value.__cause__ is None and exc.value.__suppress_context__


# -- infisical ------------------------------------------------------------------------------------


@pytest.fixture
def fake() -> FakeInfisical:
    server = FakeInfisical(client_id="5a1f7c2e-1111-4222-8333-944455556666")
    yield server
    server.close()


def _seed(fake: FakeInfisical) -> dict[str, str]:
    values = {"RELAYMD_WORKER_TOKEN": _value("wt"), "RELAYMD_S3_SECRET_ACCESS_KEY": _value("s3"),
              "RELAYMD_S3_ACCESS_KEY_ID": _value("id")}
    fake.add_secrets(PROJECT, "prod", values)
    fake.add_secrets(PROJECT, "dev", {"RELAYMD_WORKER_TOKEN": _value("devwt")})
    return values


def _provider(fake: FakeInfisical, **kw: object) -> InfisicalSecrets:
    args: dict[str, object] = {"site_url": fake.base_url, "client_id": fake.identity.client_id,
                               "client_secret": fake.identity.client_secret, "project_id": PROJECT,
                               "timeout": 2.0}
    args.update(kw)
    return InfisicalSecrets(**args)  # type: ignore[arg-type]


def test_infisical_login_then_list_returns_the_secrets(fake: FakeInfisical) -> None:
    values = _seed(fake)
    provider = _provider(fake)
    assert isinstance(provider, SecretsProvider) and provider.name == "infisical"
    assert provider.fetch() == values


def test_infisical_sends_the_documented_requests(fake: FakeInfisical) -> None:
    _seed(fake)
    _provider(fake, environment="prod", path="/").fetch()
    [login] = fake.calls(LOGIN)
    assert login.method == "POST" and login.headers["content-type"].startswith("application/json")
    assert login.body == {"clientId": fake.identity.client_id, "clientSecret": fake.identity.client_secret}
    [listing] = fake.calls(LIST_V4)
    assert listing.method == "GET"
    assert listing.query["projectId"] == PROJECT
    assert listing.query["environment"] == "prod"
    assert listing.query["secretPath"] == "/"
    assert listing.query["viewSecretValue"] == "true"
    [token] = fake.issued_tokens()
    assert listing.headers["authorization"] == f"Bearer {token}"
    assert "authorization" not in login.headers  # the login itself carries no token


def test_infisical_reads_the_given_environment_and_folder(fake: FakeInfisical) -> None:
    _seed(fake)
    nested = {"RELAYMD_SALAD_API_KEY": _value("salad")}
    fake.add_secrets(PROJECT, "staging", nested, path="/relaymd/orchestrator")
    assert _provider(fake, environment="staging", path="relaymd/orchestrator/").fetch() == nested
    assert fake.calls(LIST_V4)[-1].query["secretPath"] == "/relaymd/orchestrator"


def test_infisical_imports_and_references(fake: FakeInfisical) -> None:
    shared = {"RELAYMD_S3_ACCESS_KEY_ID": "shared-id", "RELAYMD_S3_SECRET_ACCESS_KEY": "shared-secret",
              "RELAYMD_TOKEN": "from-import"}
    fake.add_secrets(PROJECT, "prod", shared, path="/shared")
    fake.add_secrets(PROJECT, "prod", {"RELAYMD_TOKEN": "own", "RELAYMD_WORKER_TOKEN": "wt-${RELAYMD_TOKEN}"})
    fake.add_import(PROJECT, "prod", "/", "prod", "/shared")
    got = _provider(fake).fetch()
    # The folder's own value beats the imported one; ${...} references come back expanded.
    assert got == {"RELAYMD_TOKEN": "own", "RELAYMD_WORKER_TOKEN": "wt-own",
                   "RELAYMD_S3_ACCESS_KEY_ID": "shared-id", "RELAYMD_S3_SECRET_ACCESS_KEY": "shared-secret"}


def test_infisical_wrong_client_secret_is_refused_without_echoing_it(fake: FakeInfisical) -> None:
    _seed(fake)
    wrong = _value("wrong-client-secret")
    provider = _provider(fake, client_secret=wrong)
    with pytest.raises(SecretsError) as exc:
        provider.fetch()
    message = str(exc.value)
    assert message.startswith("infisical: login refused (check the client id/secret of the machine identity")
    assert "Invalid credentials" in message  # what Infisical said, passed on
    for text in (message, repr(exc.value), repr(provider), str(vars(provider))):
        assert wrong not in text
    assert len(fake.calls(LOGIN)) == 1 and not fake.calls(LIST_V4)  # a 401 is not retried


def test_infisical_retries_a_500_then_succeeds(fake: FakeInfisical) -> None:
    values = _seed(fake)
    fake.fail(times=1, status=500, path=LOGIN)
    fake.fail(times=1, status=503, path=LIST_V4)
    start = time.monotonic()
    assert _provider(fake).fetch() == values
    assert len(fake.calls(LOGIN)) == 2 and len(fake.calls(LIST_V4)) == 2
    assert time.monotonic() - start >= 0.4  # two 0.2 s backoffs, not a busy loop


def test_infisical_gives_up_after_three_500s(fake: FakeInfisical) -> None:
    _seed(fake)
    fake.fail(times=5, status=500)
    with pytest.raises(SecretsError) as exc:
        _provider(fake).fetch()
    assert "3 times" in str(exc.value) and "HTTP 500" in str(exc.value)
    assert len(fake.calls(LOGIN)) == 3


def test_infisical_hanging_server_fails_in_bounded_time(fake: FakeInfisical) -> None:
    _seed(fake)
    fake.hang(seconds=30, times=3, path=LIST_V4)
    start = time.monotonic()
    with pytest.raises(SecretsError) as exc:
        _provider(fake, timeout=0.3).fetch()
    elapsed = time.monotonic() - start
    assert "no answer within 0.3s" in str(exc.value) and "3 times" in str(exc.value)
    assert len(fake.calls(LIST_V4)) == 3
    assert elapsed < 4.0  # 3 x 0.3 s timeouts + 0.2 + 0.5 s backoff, not 30 s


def test_infisical_hang_once_then_answer(fake: FakeInfisical) -> None:
    values = _seed(fake)
    fake.hang(seconds=30, times=1, path=LOGIN)
    assert _provider(fake, timeout=0.3).fetch() == values


def test_infisical_unreachable_site(fake: FakeInfisical) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SecretsError) as exc:
        _provider(fake, site_url=f"http://127.0.0.1:{port}").fetch()
    assert "cannot connect" in str(exc.value) and "3 times" in str(exc.value)


@pytest.mark.parametrize("path", [LOGIN, LIST_V4])
def test_infisical_garbage_body(fake: FakeInfisical, path: str) -> None:
    _seed(fake)
    fake.garbage(times=1, path=path)
    with pytest.raises(SecretsError) as exc:
        _provider(fake).fetch()
    assert "not JSON" in str(exc.value) and "text/html" in str(exc.value)
    assert "nginx" not in str(exc.value)  # the body itself is never echoed


@pytest.mark.parametrize("path", [LOGIN, LIST_V4])
def test_infisical_wrong_shape_json(fake: FakeInfisical, path: str) -> None:
    _seed(fake)
    fake.wrong_shape(times=1, path=path)
    with pytest.raises(SecretsError, match="accessToken|'secrets' list"):
        _provider(fake).fetch()


def test_infisical_unknown_project_is_a_clear_error(fake: FakeInfisical) -> None:
    _seed(fake)
    with pytest.raises(SecretsError) as exc:
        _provider(fake, project_id="no-such-project").fetch()
    assert "project no-such-project not found" in str(exc.value)
    assert "project's ID" in str(exc.value)


def test_infisical_project_without_membership_is_denied(fake: FakeInfisical) -> None:
    _seed(fake)
    fake.members = set()
    with pytest.raises(SecretsError) as exc:
        _provider(fake).fetch()
    assert f"access to project {PROJECT} environment prod denied" in str(exc.value)


def test_infisical_unknown_environment_is_not_silently_empty(fake: FakeInfisical) -> None:
    _seed(fake)
    with pytest.raises(SecretsError) as exc:
        _provider(fake, environment="production").fetch()  # the slug is "prod"
    assert "no secrets" in str(exc.value) and "production" in str(exc.value)


def test_infisical_expired_token_is_reported(fake: FakeInfisical) -> None:
    _seed(fake)
    fake.token_ttl = -1  # every token it issues has already expired
    with pytest.raises(SecretsError, match="access token from login was refused"):
        _provider(fake).fetch()


def test_infisical_values_hidden_from_the_identity(fake: FakeInfisical) -> None:
    _seed(fake)
    fake.hide_values = True
    with pytest.raises(SecretsError, match="Read Value"):
        _provider(fake).fetch()


def test_infisical_falls_back_to_v3_on_an_older_server(fake: FakeInfisical) -> None:
    values = _seed(fake)
    fake.v4 = False
    assert _provider(fake).fetch() == values
    [v3] = fake.calls(LIST_V3)
    assert v3.query["workspaceId"] == PROJECT and "projectId" not in v3.query


def test_infisical_bad_site_url() -> None:
    for url in ("app.infisical.com", "ftp://example.org", ""):
        with pytest.raises(SecretsError, match="site_url"):
            InfisicalSecrets(url, "cid", "cs", PROJECT)
    assert InfisicalSecrets("https://eu.infisical.com/api/", "c", "s", PROJECT).site_url \
        == "https://eu.infisical.com"


def test_infisical_uses_the_given_transport() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == LOGIN:
            return httpx.Response(200, json={"accessToken": "tok", "expiresIn": 60,
                                             "accessTokenMaxTTL": 60, "tokenType": "Bearer"})
        assert request.headers["authorization"] == "Bearer tok"
        return httpx.Response(200, json={"secrets": [{"secretKey": "RELAYMD_TOKEN", "secretValue": "v"}],
                                         "imports": []})

    provider = InfisicalSecrets("https://infisical.example.org", "cid", "cs", PROJECT,
                                transport=httpx.MockTransport(answer))
    assert provider.fetch() == {"RELAYMD_TOKEN": "v"}
    assert seen == [LOGIN, LIST_V4]


def test_infisical_logs_carry_no_secrets(fake: FakeInfisical, caplog: pytest.LogCaptureFixture) -> None:
    values = _seed(fake)
    fake.fail(times=1, status=500, path=LIST_V4)  # a retry warning is logged too
    caplog.set_level(logging.DEBUG)  # httpx/httpcore debug output included
    assert _provider(fake).fetch() == values
    [token] = fake.issued_tokens()
    assert caplog.records, "expected some log output to check"
    assert any(r.levelno == logging.WARNING and "retrying" in r.getMessage() for r in caplog.records)
    text = caplog.text + "\n".join(f"{r.msg!r} {r.args!r}" for r in caplog.records)
    for secret in (*values.values(), fake.identity.client_secret, token):
        assert secret not in text


def test_infisical_failed_login_logs_carry_no_secrets(fake: FakeInfisical,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _seed(fake)
    wrong = _value("wrong")
    caplog.set_level(logging.DEBUG)
    fake.fail(times=1, status=502, path=LOGIN)
    with pytest.raises(SecretsError):
        _provider(fake, client_secret=wrong).fetch()
    assert wrong not in caplog.text and fake.identity.client_secret not in caplog.text


# -- log redaction --------------------------------------------------------------------------------


def test_redact_secrets_filter_masks_msg_args_and_tracebacks() -> None:
    token, key = _value("tok"), _value("key")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(RedactSecrets([token, key, "", None]))
    logger = logging.getLogger(f"relaymd.test.redact.{secrets.token_hex(4)}")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    logger.info(f"token in the message: {token}")
    logger.warning("token in the args: %s and %d", token, 7)
    logger.warning("in a mapping: %(k)s", {"k": key})
    logger.info("in an object: %s", {"RELAYMD_S3_SECRET_ACCESS_KEY": key})
    logger.info("no secret here: %s", "plain")
    try:
        raise RuntimeError(f"failed with {key}")
    except RuntimeError:
        logger.exception("boom")

    out = stream.getvalue()
    assert token not in out and key not in out
    assert "token in the message: ****" in out
    assert "token in the args: **** and 7" in out
    assert "in a mapping: ****" in out
    assert "'RELAYMD_S3_SECRET_ACCESS_KEY': '****'" in out
    assert "no secret here: plain" in out
    assert "RuntimeError: failed with ****" in out


def test_redact_secrets_longest_first_and_added_later() -> None:
    short, long_ = "abc123", "abc123-and-more"
    f = RedactSecrets([short])
    f.add(long_)
    assert f.redact(f"{long_} / {short}") == "**** / ****"
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "v=%s", (long_,), None)
    assert f.filter(record) and record.getMessage() == "v=****"


def test_fake_answers_bad_tokens_as_infisical_does(fake: FakeInfisical) -> None:
    # Keeps the stand-in honest: the shapes the provider's error handling is written against.
    _seed(fake)
    query = {"projectId": PROJECT, "environment": "prod"}
    with httpx.Client(base_url=fake.base_url) as client:
        missing = client.get(LIST_V4, params=query)
        bogus = client.get(LIST_V4, params=query, headers={"Authorization": "Bearer not-a-token"})
        login = client.post(LOGIN, json={"clientId": fake.identity.client_id, "clientSecret": "nope"})
        invalid = client.post(LOGIN, json={"clientSecret": "x"})
        route = client.get("/api/v9/nothing")
    assert missing.status_code == 401 and missing.json()["error"] == "UnauthorizedError"
    assert bogus.status_code == 403 and bogus.json()["error"] == "TokenError"
    assert login.status_code == 401
    assert {k: login.json()[k] for k in ("statusCode", "message", "error")} \
        == {"statusCode": 401, "message": "Invalid credentials", "error": "UnauthorizedError"}
    assert invalid.status_code == 422 and invalid.json()["error"] == "ValidationFailure"
    assert route.status_code == 404 and route.json()["message"].startswith("Route GET:/api/v9/nothing")
