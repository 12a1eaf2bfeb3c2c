"""The package's shape, kept true by test: one state authority (no job or worker status spelled
as a string outside the models and the state machine), no import cycle, and no module over
~400 lines without a stated reason at its top."""

from __future__ import annotations

import ast
from pathlib import Path

from relaymd.models import JobStatus, WorkerStatus

PACKAGE = Path(__file__).resolve().parent.parent / "relaymd"
STATUSES = {s.value for s in JobStatus} | {s.value for s in WorkerStatus}
STATE_OWNERS = {"models.py", "server/transitions.py"}
MAX_LINES = 400
SIZE_REASON = "Over 400 lines because"  # how a long module states why it is one unit


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _status_literal(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return isinstance(node.value, str) and node.value in STATUSES
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return bool(node.elts) and all(_status_literal(e) for e in node.elts)
    return False


def _collects_statuses(node: ast.AST) -> bool:
    if isinstance(node, ast.Compare):  # status == "queued", status in ("idle", "busy")
        return any(_status_literal(n) for n in [node.left, *node.comparators])
    if isinstance(node, ast.Tuple | ast.List | ast.Set):  # a state set spelled out
        return len(node.elts) > 1 and _status_literal(node)
    if isinstance(node, ast.Dict):  # a table keyed by status
        return bool(node.keys) and all(k is not None and _status_literal(k) for k in node.keys)
    return False


def status_literals(source: str) -> list[int]:
    """Lines that compare with, or collect, job/worker statuses spelled as strings (a call's
    argument such as an action name or a stop reason is not a status and is not counted)."""
    return sorted({node.lineno for node in ast.walk(ast.parse(source))
                   if _collects_statuses(node)})


def test_the_status_finder_finds_what_it_is_meant_to() -> None:
    assert status_literals('if row["status"] == "queued": pass') == [1]
    assert status_literals('x = w["status"] in ("idle", "busy")') == [1]
    assert status_literals('STYLE = {"failed": "red", "gone": "dim"}') == [1]
    assert status_literals('machine.change_worker(w, "stale", "silent")') == []
    assert status_literals('if state == GROUP_FAILED: pass') == []


def test_no_status_is_spelled_outside_the_models_and_the_state_machine() -> None:
    found = []
    for path in modules().values():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in STATE_OWNERS:
            continue
        found += [f"{rel}:{line}" for line in status_literals(path.read_text())]
    assert not found, ("statuses spelled as strings (use JobStatus/WorkerStatus or the state "
                       f"sets in relaymd.models): {found}")


def import_graph() -> dict[str, set[str]]:
    """module -> relaymd modules it imports, at module level or inside functions (imports under
    `if TYPE_CHECKING:` are left out: they never run)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        stack: list[ast.AST] = [ast.parse(path.read_text())]
        while stack:
            node = stack.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                    continue
                names: list[str] = []
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    base = child.module or ""
                    if child.level:
                        up = package.split(".")[:len(package.split(".")) - (child.level - 1)]
                        base = ".".join([*up, base] if base else up)
                    names = [base, *(f"{base}.{a.name}" for a in child.names)]
                for name in names:
                    target = resolve(name) if name.startswith("relaymd") else None
                    if target and target != mod:
                        graph[mod].add(target)
                stack.append(child)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_has_no_cycle() -> None:
    graph = import_graph()
    assert graph["relaymd.server.orchestrator"], "the import scan found nothing: it is broken"
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_long_modules_say_why_they_are_one_unit() -> None:
    long = []
    for path in modules().values():
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES and SIZE_REASON not in doc:
            long.append(f"{path.relative_to(PACKAGE)} ({lines} lines)")
    assert not long, (f"modules over {MAX_LINES} lines without '{SIZE_REASON} ...' in their "
                      f"docstring: {long}")
