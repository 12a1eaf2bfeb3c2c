"""A restartable OpenMM runner (`python -m relaymd.engines.openmm`) and the example job builder.

OpenMM is imported lazily: the package imports without it (the `md` extra installs it)."""
