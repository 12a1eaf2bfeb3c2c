"""RelayMD: multi-day molecular dynamics as logical jobs that hop between short-lived GPU workers."""

__version__ = "0.1.0"
