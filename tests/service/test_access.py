"""API keys (401), rate limits (429), CORS: off by default, and what each lets in when it is on."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.access import AccessError, RateLimiter, key_id, read_keys
from service.app import create_app
from tests.service.helpers import make_settings, scene_jpeg

GOOD = "stl-key-Alpha-7f3a9c"
OTHER = "stl-key-Bravo-51d2e0"
WRONG = "stl-key-Guess-000000"
SHOP_ORIGIN = "https://shop.example"


def post(client: TestClient, key: str | None = None, category: str = "Shoes"):
    return client.post("/recommend", data={"category": category}, headers={"X-API-Key": key} if key else {},
                       files={"image": ("scene.jpg", scene_jpeg(), "image/jpeg")})


def a_product(client: TestClient, key: str = GOOD) -> str:
    answer = post(client, key)
    assert answer.status_code == 200, answer.text
    return answer.json()["items"][0]["product_id"]


@pytest.fixture(scope="module")
def keyed(built: dict[str, Path]) -> Iterator[TestClient]:
    settings = make_settings(built["root"], api_keys=f"{GOOD}, {OTHER}", rate_limit="1/min", rate_burst=3)
    with TestClient(create_app(settings)) as client:
        yield client


def sample(client: TestClient, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return found.value
    return 0.0


def test_no_key_wrong_key_good_key_then_over_the_limit(keyed: TestClient) -> None:
    missing = keyed.get("/facets", params={"category": "Shoes"})
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert "API key" in missing.json()["detail"]
    wrong = keyed.get("/facets", params={"category": "Shoes"}, headers={"Authorization": f"Bearer {WRONG}"})
    assert wrong.status_code == 401 and "invalid_token" in wrong.headers["WWW-Authenticate"]
    assert post(keyed).status_code == 401  # /recommend too, before any work
    # Burst 3 at 1/min: three requests with the key, whichever header carries it, then 429.
    assert keyed.get("/facets", params={"category": "Shoes"},
                     headers={"Authorization": f"Bearer {GOOD}"}).status_code == 200
    assert keyed.get("/facets", params={"category": "Shoes"}, headers={"X-API-Key": GOOD}).status_code == 200
    assert post(keyed, GOOD).status_code == 200
    limited = keyed.get("/facets", params={"category": "Shoes"}, headers={"X-API-Key": GOOD})
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) >= 1
    # Buckets are per key: the other key still has its burst.
    assert keyed.get("/facets", params={"category": "Shoes"}, headers={"X-API-Key": OTHER}).status_code == 200
    assert sample(keyed, "stl_access_total", key=key_id(GOOD), outcome="rate_limited") == 1.0
    assert sample(keyed, "stl_access_total", key=key_id(GOOD), outcome="allowed") == 3.0
    assert sample(keyed, "stl_unauthorized_total", reason="missing") == 2.0
    assert sample(keyed, "stl_unauthorized_total", reason="wrong") == 1.0


def test_open_endpoints_need_no_key(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/categories", "/"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.post("/admin/reload").status_code == 403  # its own token (unset here), not an API key


def test_every_key_is_compared_with_compare_digest(built: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with TestClient(create_app(make_settings(built["root"], api_keys=f"{GOOD},{OTHER}"))) as client:
        assert client.get("/products/nope", headers={"X-API-Key": GOOD}).status_code == 404  # let in
        assert client.get("/products/nope", headers={"X-API-Key": WRONG}).status_code == 401
    # Both configured keys compared each time, the first match not ending the loop early.
    assert calls == [(GOOD.encode(), GOOD.encode()), (GOOD.encode(), OTHER.encode()),
                     (WRONG.encode(), GOOD.encode()), (WRONG.encode(), OTHER.encode())]


def test_keys_never_reach_the_logs(built: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    settings = make_settings(built["root"], api_keys=f"{GOOD},{OTHER}", rate_limit="1/min", rate_burst=1)
    assert GOOD not in repr(settings) and GOOD not in str(settings.model_dump())
    with TestClient(create_app(settings)) as client:
        product = a_product(client)
        for key in (GOOD, WRONG, OTHER):
            client.get(f"/products/{product}", headers={"Authorization": f"Bearer {key}"})
        metrics = client.get("/metrics").text
    assert caplog.records, "nothing was logged at all: the check would prove nothing"
    for key in (GOOD, OTHER, WRONG):
        assert key not in caplog.text
        assert key not in metrics
    assert key_id(GOOD) in metrics


def test_rate_limit_per_address_without_keys(built: dict[str, Path]) -> None:
    with TestClient(create_app(make_settings(built["root"], rate_limit="1/min"))) as client:
        assert client.get("/facets", params={"category": "Shoes"}).status_code == 200
        limited = client.get("/facets", params={"category": "Shoes"})
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "60"
        assert client.get("/categories").status_code == 200  # not a protected endpoint


def test_token_bucket_refills_at_its_rate() -> None:
    limiter = RateLimiter(rate=2.0, burst=2, max_buckets=2)
    assert limiter.take("a", now=0.0) == 0.0 and limiter.take("a", now=0.0) == 0.0
    assert limiter.take("a", now=0.0) == pytest.approx(0.5)  # one token every half second
    assert limiter.take("a", now=0.5) == 0.0
    assert limiter.take("a", now=0.5) == pytest.approx(0.5)
    assert limiter.take("a", now=10.0) == 0.0  # refilled, never past the burst
    assert limiter.take("a", now=10.0) == 0.0 and limiter.take("a", now=10.0) > 0
    limiter.take("b", now=10.0)
    limiter.take("c", now=10.0)  # over max_buckets: the least recently seen ("a") is forgotten
    assert limiter.take("a", now=10.0) == 0.0


def test_keys_from_a_file(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# shop keys\n{GOOD}\n\n  {OTHER}  \n")
    assert read_keys(make_settings(tmp_path, api_keys=f"@{keys}")) == [GOOD, OTHER]
    assert read_keys(make_settings(tmp_path, api_keys_file=keys, api_keys="k3")) == ["k3", GOOD, OTHER]
    assert read_keys(make_settings(tmp_path, api_keys="")) == []
    with pytest.raises(AccessError, match="cannot read"):
        read_keys(make_settings(tmp_path, api_keys=f"@{tmp_path / 'absent'}"))
    (tmp_path / "empty").write_text("# none yet\n")
    with pytest.raises(AccessError, match="holds no key"):
        create_app(make_settings(tmp_path, api_keys_file=tmp_path / "empty"))


def test_key_file_that_is_not_utf8_is_unreadable(tmp_path: Path) -> None:
    # The fuzzer's case: a Latin-1 key file was a UnicodeDecodeError traceback at start-up.
    keys = tmp_path / "keys.txt"
    keys.write_bytes(f"{GOOD}\n".encode() + b"caf\xe9\n")
    with pytest.raises(AccessError, match=r"cannot read the API key file .*keys\.txt: not UTF-8 text") as error:
        read_keys(make_settings(tmp_path, api_keys_file=keys))
    assert GOOD not in str(error.value)  # the reason only, never what the file holds


@pytest.mark.parametrize("blank", [",", ", ,", " ,\t, "])
def test_inline_keys_that_are_all_blank_are_refused(tmp_path: Path, blank: str) -> None:
    # STL_API_KEYS=", ," parsed to no key, and no key means an open API: refused like an empty key file.
    with pytest.raises(AccessError, match="STL_API_KEYS holds no key"):
        create_app(make_settings(tmp_path, api_keys=blank))
    assert read_keys(make_settings(tmp_path, api_keys=f"{GOOD}, ,")) == [GOOD]  # a stray comma is fine


def test_cors_headers_only_when_configured(built: dict[str, Path], client: TestClient) -> None:
    plain = client.get("/categories", headers={"Origin": SHOP_ORIGIN})
    assert "access-control-allow-origin" not in plain.headers
    settings = make_settings(built["root"], cors_origins=f"{SHOP_ORIGIN}, https://other.example", api_keys=GOOD)
    with TestClient(create_app(settings)) as shop:
        preflight = shop.options("/recommend", headers={
            "Origin": SHOP_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key, x-request-timeout-ms"})
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == SHOP_ORIGIN
        assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
        refused = shop.get("/facets", params={"category": "Shoes"}, headers={"Origin": SHOP_ORIGIN})
        assert refused.status_code == 401  # the browser can read the refusal: it carries the CORS headers
        assert refused.headers["access-control-allow-origin"] == SHOP_ORIGIN
        stranger = shop.get("/categories", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in stranger.headers
