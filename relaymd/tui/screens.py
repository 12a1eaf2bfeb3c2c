"""The console's modal screens: confirm, submit form, help."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.suggester import Suggester
from textual.widgets import Button, Input, Label, Static

HELP = """\
[b]RelayMD console[/b]   every key is also in the command palette (ctrl+p)

  [b]1 2 3[/b]    views: jobs and workers, clusters, GPU-hours usage
  [b]s[/b]        submit a job directory
  [b]c[/b] / [b]r[/b]    cancel (asks first) / requeue the selected job
  [b]enter[/b]    show or hide the selected job's details
  [b]/[/b]        filter jobs by id, title or state
  [b]escape[/b]   close the details, then clear the filter (other views: back)
  [b]e[/b] / [b]d[/b]    clusters view: enable / disable the selected cluster (asks)
  [b]tab[/b]      next table
  [b]?[/b]        this help
  [b]q[/b]        quit (workers keep running; they reconnect to the next one)

Workers, SLURM jobs and checkpoints outlive the console: quitting only
stops this orchestrator. Times are local, with their UTC offset.
"""


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; border: thick $warning; padding: 1 2;
                               background: $surface; }
    ConfirmScreen Label { width: 100%; }
    ConfirmScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    ConfirmScreen Button { margin-left: 2; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(self.question)
            with Horizontal():
                yield Button("Yes (y)", id="yes", variant="warning")
                yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class PathSuggester(Suggester):
    """Completes a directory path as it is typed."""

    def __init__(self) -> None:
        super().__init__(use_cache=False, case_sensitive=True)

    async def get_suggestion(self, value: str) -> str | None:
        return await asyncio.to_thread(complete_dir, value) if value else None


def complete_dir(value: str) -> str | None:
    """`value` extended to the first directory whose name starts with its last part."""
    expanded = os.path.expanduser(value)
    parent, slash, stem = expanded.rpartition("/")
    base = Path(parent or "/") if slash else Path(".")
    try:
        names = sorted(p.name for p in base.iterdir()
                       if p.name.startswith(stem) and p.name != stem and p.is_dir()
                       and (stem.startswith(".") or not p.name.startswith(".")))
    except OSError:
        return None
    return value[: len(value) - len(stem)] + names[0] + "/" if names else None


class SubmitScreen(ModalScreen[dict[str, object] | None]):
    """The submit form; dismisses with the fields (the app submits and reports errors here)."""

    BINDINGS = [Binding("escape", "cancel", "Close")]
    DEFAULT_CSS = """
    SubmitScreen { align: center middle; }
    SubmitScreen > Vertical { width: 76; height: auto; border: thick $primary; padding: 0 1;
                              background: $surface; }
    SubmitScreen Label.field { margin-top: 1; }
    SubmitScreen #error { color: $error; height: auto; }
    SubmitScreen Horizontal { height: auto; align-horizontal: right; margin-top: 1; }
    SubmitScreen Button { margin-left: 2; }
    """

    def __init__(self, start_dir: str = "") -> None:
        super().__init__()
        self.start_dir = start_dir

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]Submit a job[/b]  (a directory with relaymd.yaml, or give a command)")
            yield Label("Directory", classes="field")
            yield Input(self.start_dir, placeholder="path/to/job", id="directory",
                        suggester=PathSuggester())
            yield Label("Title (default: the directory name)", classes="field")
            yield Input(placeholder="", id="title")
            yield Label("Command (default: from relaymd.yaml)", classes="field")
            yield Input(placeholder="python run.py", id="command")
            yield Label("Checkpoint globs, space separated (default: from relaymd.yaml)",
                        classes="field")
            yield Input(placeholder="*.xml *.chk", id="checkpoint")
            yield Label("GPUs (default: from relaymd.yaml)", classes="field")
            yield Input(placeholder="1", id="gpus", type="integer")
            yield Static("", id="error")
            with Horizontal():
                yield Button("Submit", id="submit", variant="primary")
                yield Button("Cancel", id="cancel")

    def fields(self) -> dict[str, object]:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value.strip()
        gpus = value("gpus")
        return {"directory": value("directory"), "title": value("title"),
                "command": value("command"), "checkpoint": value("checkpoint").split(),
                "gpus": int(gpus) if gpus else None}

    def show_error(self, message: str) -> None:
        self.query_one("#error", Static).update(message)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "submit":
            self.submit()
        else:
            self.dismiss(None)

    def submit(self) -> None:
        f = self.fields()
        directory = Path(os.path.expanduser(str(f["directory"])))
        if not f["directory"] or not directory.is_dir():
            self.show_error(f"not a directory: {f['directory'] or '(empty)'}")
            return
        self.app.submit_from_form(self, {**f, "directory": directory})  # type: ignore[attr-defined]

    def action_cancel(self) -> None:
        self.dismiss(None)


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "close", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Static { width: 80; height: auto; border: thick $primary; padding: 1 2;
                          background: $surface; }
    """

    def compose(self) -> ComposeResult:
        yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
