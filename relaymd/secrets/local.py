"""The providers that read this machine: `env` (RELAYMD_* variables of the process environment)
and `file` (a YAML or JSON file of NAME: value that only its owner may read)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from relaymd.secrets.base import SECRET_NAMES, SecretsError

# -- env ------------------------------------------------------------------------------------------


class EnvSecrets:
    """RELAYMD_* secret variables of the process environment (the default provider)."""

    name = "env"

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def fetch(self) -> dict[str, str]:
        # AWS_* stay where they are: boto3 reads them from the environment itself.
        return {k: v for k, v in self._environ.items()
                if k.startswith("RELAYMD_") and k in SECRET_NAMES and v}

    def __repr__(self) -> str:
        return "EnvSecrets()"


# -- file -----------------------------------------------------------------------------------------


class _SecretsLoader(yaml.SafeLoader):
    """safe_load, except that numbers, booleans and dates stay the text written: a token such as
    0123 (YAML 1.1 octal: 83), 1e3 (1000.0) or `yes` (True) must not be rewritten on the way; and
    a name given twice is an error, not "the last one wins" (two tokens: which was meant?)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may override on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(None, None, f"the name {key} is given twice",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _as_written(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


for _tag in ("int", "float", "bool", "timestamp"):
    _SecretsLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _as_written)

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """Where and what, without the quoted source line PyYAML puts into str(exc)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    # Problems can quote a character or a tag from the file: drop anything quoted.
    what = f": {_QUOTED.sub('(…)', problem)}" if isinstance(problem, str) else ""
    return f"not valid YAML or JSON{where}{what}"


class FileSecrets:
    """A YAML or JSON mapping NAME: value in a file only its owner can read (mode 0600)."""

    name = "file"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileSecrets({str(self.path)!r})"

    def fetch(self) -> dict[str, str]:
        path = self.path
        # Open first, then check the mode of what was opened (fstat): no window in which the file
        # checked and the file read differ.
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise SecretsError(f"file: secrets file {path} does not exist; create it with "
                               f"`install -m 600 /dev/null {path}` and add NAME: value lines, "
                               "or point the config at the right file") from None
        except OSError as exc:
            raise SecretsError(f"file: cannot open secrets file {path}: {exc.strerror}; "
                               "check the path and that this user may read it") from None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise SecretsError(f"file: {path} is not a regular file; give the path of a YAML or "
                                   "JSON file of NAME: value")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise SecretsError(f"file: secrets file {path} has mode {mode:04o}: group or others "
                                   f"may read or change it; run `chmod 600 {path}`")
            raw = fh.read()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise SecretsError(f"file: {path} is not UTF-8 text; save it as UTF-8 YAML or JSON") from None
        try:
            data = yaml.load(text, Loader=_SecretsLoader)  # a SafeLoader: no arbitrary objects
        except yaml.YAMLError as exc:
            # `from None`: the YAMLError's own text quotes the offending line, which may hold a secret.
            raise SecretsError(f"file: {path}: {_yaml_problem(exc)}; fix the file (NAME: value, one "
                               "per line, or a JSON object)") from None
        if data is None:
            raise SecretsError(f"file: {path} is empty; add NAME: value lines "
                               "(e.g. RELAYMD_WORKER_TOKEN: ...)")
        if not isinstance(data, dict):
            raise SecretsError(f"file: {path} holds a {_kind(data)}, not a mapping; write NAME: value "
                               "lines or a JSON object")
        out: dict[str, str] = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key:
                raise SecretsError(f"file: {path}: every key must be a name such as RELAYMD_WORKER_TOKEN "
                                   f"(found a {_kind(key)} key)")
            if value is None or value == "":
                continue  # like an empty environment variable: not set
            if not isinstance(value, str):
                raise SecretsError(f"file: {path}: the value of {key} is a {_kind(value)}; "
                                   "secrets are single strings (quote it)")
            out[key] = value
        return out


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list | tuple):
        return "list"
    if isinstance(value, str):
        return "string"
    return "null" if value is None else type(value).__name__

