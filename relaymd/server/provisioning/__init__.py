"""Providers that bring workers to queued work. The embedded default has one: `local`."""
