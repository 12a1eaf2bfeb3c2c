"""`python -m relaymd.cli` runs the CLI, like `python -m relaymd`."""

from relaymd.cli import main

main()
