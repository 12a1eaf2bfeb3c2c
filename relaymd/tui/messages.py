"""How news reaches the console from outside Textual: the orchestrator's change listener posts
`Changed` (bursts coalesce), and `PanelHandler` turns log records into `LogLine`s for the log
pane. Both go through `post_message`, which is safe from any thread."""

from __future__ import annotations

import logging
from typing import Any

from textual.app import App
from textual.message import Message


class Changed(Message):
    """The orchestrator committed a change to `what` ("jobs", "workers" or "clusters")."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, Changed) and message.what == self.what


class LogLine(Message):
    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line


class PanelHandler(logging.Handler):
    """Forwards log records into the console's log pane (post_message is thread-safe)."""

    def __init__(self, app: App[Any]) -> None:
        super().__init__(logging.INFO)
        self.app = app
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.app.post_message(LogLine(self.format(record)))
        except Exception:
            pass
