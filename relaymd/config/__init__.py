"""Settings: embedded defaults, overridden by the YAML config file, a secrets provider, then by
RELAYMD_<FIELD> environment variables and command-line flags.

With no file at all the embedded default applies: data under ~/.local/share/relaymd (or
$RELAYMD_HOME), a SQLite file, `file://` storage, API on 127.0.0.1:8765.

- `settings`: the two roles, `OrchestratorSettings` and `WorkerSettings`, and the parts they share;
- `clusters`: the orchestrator's `clusters:` entries (SLURM, Salad, local);
- `loading`: `load_settings(..., role=...)`, the layering and its error messages;
- `paths`: the default data directory and config file.
"""

from relaymd.config.clusters import (
    DEFAULT_CLUSTER_PRIORITY,
    LOCAL_CLUSTER,
    ClusterConfig,
    ClusterName,
    Provider,
    SaladSettings,
    SlurmSettings,
)
from relaymd.config.loading import ConfigError, load_settings
from relaymd.config.paths import default_config_path, default_home
from relaymd.config.settings import (
    ENV_PREFIX,
    S3_FIELDS,
    CommonSettings,
    OrchestratorSettings,
    ReachSettings,
    StorageSettings,
    WorkerSettings,
)

__all__ = [
    "DEFAULT_CLUSTER_PRIORITY", "ENV_PREFIX", "LOCAL_CLUSTER", "S3_FIELDS", "ClusterConfig", "ClusterName",
    "CommonSettings", "ConfigError", "OrchestratorSettings", "Provider", "ReachSettings",
    "SaladSettings", "SlurmSettings", "StorageSettings", "WorkerSettings", "default_config_path",
    "default_home", "load_settings",
]
