"""The headless worker (`relaymd worker`): claims jobs, runs their engine, ships checkpoints.

It never imports the server or the console: it talks to the orchestrator only over HTTP.
"""
