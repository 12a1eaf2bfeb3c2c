"""`python -m relaymd` runs the CLI."""

from relaymd.cli import main

main()
