"""Every client mistake gets a 4xx with a JSON `detail` saying what was wrong; the server keeps serving."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from tests.service.helpers import draw, encode, post, scene_jpeg


def png_with_size(width: int, height: int) -> bytes:
    """A valid small PNG whose header claims another size (a decompression bomb's header)."""
    data = bytearray(encode(Image.new("RGB", (8, 8)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


PICTURE = draw(np.random.default_rng(1), 64)


@pytest.mark.parametrize(
    ("image", "fields", "status", "message"),
    [
        (b"hello, I am text", {}, 400, "not an image"),
        (b"", {}, 400, "empty"),
        (scene_jpeg()[:400], {}, 400, "truncated or corrupt"),
        (scene_jpeg()[:len(scene_jpeg()) * 2 // 3], {}, 400, "truncated or corrupt"),
        (scene_jpeg()[:200] + b"\x00" * 3000, {}, 400, "truncated or corrupt"),
        (encode(PICTURE, "GIF"), {}, 415, "unsupported image format GIF"),
        (encode(PICTURE, "BMP"), {}, 415, "unsupported image format BMP"),
        (encode(PICTURE, "TIFF"), {}, 415, "unsupported image format TIFF"),
        (encode(Image.new("RGB", (1200, 1000)), "PNG"), {}, 413, "1200000 pixels"),
        (png_with_size(100_000, 100_000), {}, 413, "pixels"),
        (None, {"bbox": "0.1,0.2,0.3"}, 400, "4 comma-separated numbers"),
        (None, {"bbox": "0.1,0.2,0.3,0.4,0.5"}, 400, "4 comma-separated numbers"),
        (None, {"bbox": "a,0.2,0.3,0.4"}, 400, "must be numbers"),
        (None, {"bbox": "nan,0.2,0.3,0.4"}, 400, "finite"),
        (None, {"bbox": "0.1,0.2,inf,0.4"}, 400, "finite"),
        (None, {"bbox": "0,0,1.5,1"}, 400, "[0, 1]"),
        (None, {"bbox": "-0.1,0,0.5,1"}, 400, "[0, 1]"),
        (None, {"bbox": "0.6,0,0.5,1"}, 400, "left"),
        (None, {"bbox": "0,0.5,1,0.5"}, 400, "top"),
        (None, {"bbox": "0.5,0.5,0.505,0.505"}, 400, "too small"),
        (None, {"category": "Hats"}, 400, "known categories"),
        (None, {"category": "   "}, 400, "unknown category"),
    ],
)
def test_bad_input_is_a_clear_4xx(client: TestClient, image, fields: dict, status: int, message: str) -> None:
    fields = dict(fields)
    category = fields.pop("category", "Shoes")
    response = post(client, image, category=category, **fields)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and message in detail
    # The server is unharmed: the next good request succeeds.
    assert post(client, k=2).status_code == 200


def test_unknown_category_lists_known_ones(client: TestClient) -> None:
    detail = post(client, category="Hats").json()["detail"]
    assert all(name in detail for name in ("Shoes", "Handbags", "Pants"))


@pytest.mark.parametrize(("fields", "field"), [({"k": 0}, "k"), ({"k": 101}, "k"), ({"k": "ten"}, "k"),
                                               ({"strategy": "random"}, "strategy")])
def test_invalid_form_fields_are_422(client: TestClient, fields: dict, field: str) -> None:
    response = post(client, **fields)
    assert response.status_code == 422
    assert any(error["loc"][-1] == field for error in response.json()["detail"])


def test_missing_fields_are_422(client: TestClient) -> None:
    no_category = post(client, category=None)
    assert no_category.status_code == 422
    assert [e["loc"] for e in no_category.json()["detail"]] == [["body", "category"]]
    no_image = client.post("/recommend", data={"category": "Shoes"})
    assert no_image.status_code == 422
    assert [e["loc"] for e in no_image.json()["detail"]] == [["body", "image"]]


def test_upload_too_large_by_content_length(client: TestClient) -> None:
    # The module client allows 0.25 MB: refused from the Content-Length header before the body is read.
    blob = np.random.default_rng(0).integers(0, 256, 600_000, dtype=np.uint8).tobytes()
    response = post(client, blob)
    assert response.status_code == 413
    assert "STL_MAX_UPLOAD_MB" in response.json()["detail"]
    assert post(client, k=1).status_code == 200


def test_upload_too_large_while_streaming(client: TestClient) -> None:
    # A chunked body has no Content-Length: the limit is enforced on the bytes as they arrive.
    boundary = "stlboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"category\"\r\n\r\nShoes\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
    sent = []

    def chunks():
        yield head
        for _ in range(40):  # 40 x 16 KiB = 640 KiB, far over the limit
            sent.append(1)
            yield b"\xff" * 16384
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/recommend", content=chunks(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 413
    assert "STL_MAX_UPLOAD_MB" in response.json()["detail"]
    assert post(client, k=1).status_code == 200


def test_image_just_under_the_pixel_limit_is_fine(client: TestClient) -> None:
    # 1,000,000 pixels is the module client's limit: exactly at it is allowed.
    response = post(client, encode(Image.new("RGB", (1000, 1000), (200, 30, 40)), "PNG"), k=1)
    assert response.status_code == 200, response.text
