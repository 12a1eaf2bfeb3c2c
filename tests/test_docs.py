"""The documentation stays true: the API reference lists exactly the routes the server has, and
the README's screenshot is one of the console's snapshot SVGs."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

from relaymd.config import Settings
from relaymd.server.api import Api
from relaymd.server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent


def test_api_reference_lists_every_route_and_no_other() -> None:
    routes = set()
    service = SimpleNamespace(settings=Settings())  # routes() reads only its settings
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
