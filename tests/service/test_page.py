"""GET / serves the shopper's page and its static files, all from this service (nothing from a CDN)."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from service.page import FILES, STATIC

# A src/href or a fetch/import naming another host: the page must work offline and behind a firewall.
EXTERNAL = re.compile(r"""(src|href)\s*=\s*["']?(https?:)?//|url\(\s*["']?(https?:)?//|@import""", re.IGNORECASE)


def test_root_serves_the_page_with_its_assets_and_a_docs_link(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert '<script src="static/app.js"' in html and 'href="static/style.css"' in html
    assert 'href="docs"' in html
    for control in ("photo-input", "category", "page-size", "api-key", "price-min", "price-max"):
        assert f'for="{control}"' in html, f"control {control} has no label"
    assert 'alt="' in html


def test_static_files_are_served_with_their_media_types(client: TestClient) -> None:
    for name, media_type in FILES.items():
        response = client.get(f"/static/{name}")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith(media_type)
        assert response.headers["cache-control"] == "no-cache"
        assert response.content == (STATIC / name).read_bytes()
    assert "fetch(api(path)" in client.get("/static/app.js").text  # every call goes to this service


def test_only_the_listed_static_files_can_be_fetched(client: TestClient) -> None:
    for name in ("index.html", "nope.js", "..%2Fpage.py", "%2E%2E%2Fapp.py"):
        assert client.get(f"/static/{name}").status_code == 404
    assert client.get("/static/../page.py").status_code == 404


def test_nothing_is_loaded_from_another_host() -> None:
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not EXTERNAL.search(text), f"{path.name} loads something from another host"


def test_the_page_stays_out_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)
    assert "/recommend" in paths
