"""The documentation stays true: the API reference lists exactly the routes the server has, and
the README's screenshot is one of the console's snapshot SVGs."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from relaymd.config import OrchestratorSettings
from relaymd.server.api import Api
from relaymd.server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_lists_every_route_and_no_other() -> None:
    routes = set()
    service = SimpleNamespace(settings=OrchestratorSettings())  # routes() reads only its settings
    for route in Api(service, Metrics()).routes():  # type: ignore[arg-type]
        for method in route.methods or ():
            if method != "HEAD":
                routes.add((method, route.path))
    text = (ROOT / "docs" / "api.md").read_text()
    documented = {(m, p) for m, p in re.findall(r"^\| (GET|POST|PUT|DELETE) \| `([^`]+)`", text,
                                                re.MULTILINE)}
    assert documented == routes, \
        f"undocumented: {sorted(routes - documented)}; gone: {sorted(documented - routes)}"


def test_readme_screenshot_is_a_snapshot_svg() -> None:
    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.svg)\)", readme)
    assert images, "the README has no console screenshot"
    for image in images:
        path = ROOT / image
        assert path.is_file() and "__snapshots__" in image, image
        assert path.read_text().lstrip().startswith("<svg"), image


def test_nothing_points_outside_the_repository() -> None:
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "deploy").rglob("*.md")]:
        assert "../shared" not in path.read_text(), f"{path} points outside the repository"


def test_the_design_names_every_module_and_only_real_ones() -> None:
    text = (ROOT / "docs" / "design.md").read_text()
    named = set(re.findall(r"`(relaymd/[\w/]+(?:\.py)?)`", text))
    for name in named:
        assert (ROOT / name).exists(), f"docs/design.md names {name}, which does not exist"
    modules = [p for p in (ROOT / "relaymd").rglob("*.py") if p.name not in ("__init__.py",
                                                                           "__main__.py")]
    for module in modules:
        rel = module.relative_to(ROOT).as_posix()
        covered = rel in named or any(rel.startswith(n.rstrip("/") + "/") for n in named
                                      if not n.endswith(".py")) \
            or f"`{module.name}`" in text
        assert covered, f"docs/design.md does not say what {rel} owns"


def test_every_layered_test_file_exists() -> None:
    from .conftest import LAYERS

    for layer, files in LAYERS.items():
        for name in files:
            assert (ROOT / "tests" / name).is_file(), f"LAYERS[{layer!r}] names {name}: gone?"


def test_the_readme_atom_walkthrough_is_what_the_atom_test_runs() -> None:
    """The README's AToM-OpenMM relaymd.yaml is tests/data/atom/relaymd.yaml, verbatim."""
    readme = (ROOT / "README.md").read_text()
    spec = (ROOT / "tests" / "data" / "atom" / "relaymd.yaml").read_text()
    assert f"```yaml\n{spec}```" in readme, "README's AToM relaymd.yaml differs from the test's"
    assert "tests/test_atom.py" in readme
