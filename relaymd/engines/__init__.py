"""MD engines that RelayMD ships: restartable runners a job's `command` can call."""
