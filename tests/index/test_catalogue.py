"""The SQLite catalogue: written atomically, read back read-only, and answering filters, facets and popularity."""

from __future__ import annotations

import io
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.catalogue import (
    Catalogue,
    CatalogueError,
    CatalogueRow,
    check_catalogue,
    make_thumbnail,
    thumbnail_etag,
    write_catalogue,
)
from index.filters import parse_filter
from training.data.products import Product

SHOES, BAGS = "Apparel|Shoes", "Apparel|Bags"


def png_bytes(size: tuple[int, int], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 30, 128) if mode == "RGBA" else (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def shoe_rows() -> list[CatalogueRow]:
    thumb, media = make_thumbnail(png_bytes((640, 320)))
    products = [
        Product("s0", "Red runner", "Acme", 40.0, "EUR", "https://shop.example/s0", True,
                {"color": ("Red", "white"), "size": ("38",)}),
        Product("s1", "Red runner (copy)", "acme", 40.0, "EUR", None, True, {"color": ("red",)}),
        Product("s2", "Boot", "Zed", 120.0, None, None, False, {"color": ("black",), "size": ("38", "39")}),
        Product("s3", "Sandal", None, None, None, None, None, {}),
        Product("s4", "Loafer", "Zed", 80.0, None, None, True, {"color": ("Black",)}),
    ]
    popularity = [5, 9, 50, 1, 7]
    groups = ["g-red", "g-red", None, None, None]  # s0 and s1 are one product photographed twice
    return [CatalogueRow(product, SHOES, row, popularity[row], groups[row],
                         thumb if row == 0 else None, media if row == 0 else None)
            for row, product in enumerate(products)]


@pytest.fixture
def catalogue_path(tmp_path: Path) -> Path:
    path = tmp_path / "artifact" / "catalogue.sqlite"
    bag = CatalogueRow(Product("b0", "Tote", "Acme", 60.0, in_stock=True, labels={"color": ("red",)}), BAGS, 0, 3)
    assert write_catalogue(path, [*shoe_rows(), bag]) == 6
    return path


def test_written_atomically_and_opened_read_only(catalogue_path: Path) -> None:
    assert [p.name for p in catalogue_path.parent.iterdir()] == ["catalogue.sqlite"]  # no temp file left
    with Catalogue.open(catalogue_path) as catalogue:
        assert len(catalogue) == 6
        assert catalogue.categories() == {BAGS: 1, SHOES: 5}
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            catalogue._connection().execute("DELETE FROM products")


def test_product_lookups(catalogue_path: Path) -> None:
    with Catalogue.open(catalogue_path) as catalogue:
        record = catalogue.product("s0")
        assert record is not None
        assert record.product == shoe_rows()[0].product  # labels keep their order and original case
        assert (record.category, record.row, record.popularity, record.group_id) == (SHOES, 0, 5, "g-red")
        assert catalogue.product("s3").group_id == "s3"  # no group given: its own
        assert catalogue.product("nope") is None
        assert sorted(catalogue.products(["s2", "nope", "b0", "s2"])) == ["b0", "s2"]
        assert [r.id for r in catalogue.by_rows(SHOES, np.array([4, 0, 2]))] == ["s4", "s0", "s2"]
        with pytest.raises(CatalogueError, match="no product for rows"):
            catalogue.by_rows(SHOES, [1, 99])


def test_thumbnails_and_etags(catalogue_path: Path) -> None:
    with Catalogue.open(catalogue_path) as catalogue:
        data, media, etag = catalogue.thumbnail("s0")
        assert catalogue.thumbnail("s1") is None
        record = catalogue.product("s0")
        assert (record.thumbnail_type, record.thumbnail_etag) == (media, etag)
        assert catalogue.product("s1").thumbnail_etag is None
    assert media in ("image/webp", "image/jpeg") and etag == thumbnail_etag(data)
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.size == (256, 128)  # aspect kept, longest side 256


def test_make_thumbnail_flattens_alpha_and_rejects_non_images(tmp_path: Path) -> None:
    data, _ = make_thumbnail(png_bytes((40, 20), "RGBA"), size=32)
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.mode == "RGB" and picture.size == (32, 16)
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(CatalogueError, match="cannot make a thumbnail"):
        make_thumbnail(tmp_path / "x.jpg")


def test_allowed_rows_and_the_in_stock_default(catalogue_path: Path) -> None:
    with Catalogue.open(catalogue_path) as catalogue:
        keys = catalogue.keys()
        assert keys == {"brand", "price", "in_stock", "color", "size"}
        everything = catalogue.allowed_rows(SHOES, None, default_in_stock=False)
        assert everything.tolist() == [0, 1, 2, 3, 4] and everything.dtype == np.int64
        assert catalogue.allowed_rows(SHOES, None).tolist() == [0, 1, 3, 4]  # s2 out of stock; s3 unknown stays
        assert catalogue.allowed_rows(SHOES, parse_filter("color=black", keys)).tolist() == [4]
        assert catalogue.allowed_rows(SHOES, parse_filter("color=black AND in_stock=false", keys)).tolist() == [2]
        assert catalogue.allowed_rows(SHOES, parse_filter("in_stock!=true", keys)).tolist() == [2, 3]
        assert catalogue.allowed_rows(SHOES, parse_filter("brand=ACME AND price<=40", keys)).tolist() == [0, 1]
        assert catalogue.allowed_rows(SHOES, parse_filter("NOT price<50", keys)).tolist() == [3, 4]
        assert catalogue.allowed_rows(SHOES, parse_filter("brand=nobody", keys)).tolist() == []
        assert catalogue.allowed_rows(BAGS, parse_filter("color=red", keys)).tolist() == [0]
        cached = catalogue.allowed_rows(SHOES, parse_filter("color=black", keys))
        assert cached is catalogue.allowed_rows(SHOES, parse_filter("color = BLACK", keys))
        assert not cached.flags.writeable


def test_popularity_fallback_honours_filter_and_groups(catalogue_path: Path) -> None:
    with Catalogue.open(catalogue_path) as catalogue:
        keys = catalogue.keys()
        # s2 (50) is out of stock; s1 (9) beats its group-mate s0 (5); s3 has popularity 1.
        assert [r.id for r in catalogue.popular(SHOES, None, k=10)] == ["s1", "s4", "s3"]
        assert [r.id for r in catalogue.popular(SHOES, None, k=10, one_per_group=False)] == ["s1", "s4", "s0", "s3"]
        assert [r.id for r in catalogue.popular(SHOES, None, k=2, offset=1)] == ["s4", "s3"]
        assert [r.id for r in catalogue.popular(SHOES, parse_filter("color=red AND price<40", keys), k=5)] == []
        red = parse_filter("color=red", keys)
        assert [r.id for r in catalogue.popular(SHOES, red, k=5)] == ["s1"]
        assert [r.id for r in catalogue.popular(SHOES, parse_filter("in_stock=false OR color=red", keys), k=5)] \
            == ["s2", "s1"]


def test_facets_count_products(catalogue_path: Path) -> None:
    with Catalogue.open(catalogue_path) as catalogue:
        facets = catalogue.facets(SHOES)
        assert (facets.total, facets.in_stock, facets.price_min, facets.price_max) == (5, 3, 40.0, 120.0)
        assert facets.brands == {"Acme": 2, "Zed": 2}  # Acme and acme are one brand, shown as first written
        assert facets.labels == {"color": {"Black": 2, "Red": 2, "white": 1}, "size": {"38": 2, "39": 1}}
        narrowed = catalogue.facets(SHOES, parse_filter("brand=zed", catalogue.keys()))
        assert narrowed.total == 2 and narrowed.labels == {"color": {"Black": 2}, "size": {"38": 1, "39": 1}}


def test_threads_share_one_catalogue(catalogue_path: Path) -> None:
    catalogue = Catalogue.open(catalogue_path)
    found: list[str] = []

    def look_up() -> None:
        found.append(catalogue.product("s4").product.title)

    threads = [threading.Thread(target=look_up) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == ["Loafer"] * 4
    assert len(catalogue._connections) == 5  # one per thread, plus the opener's
    catalogue.close()


def test_write_refuses_duplicates_and_open_refuses_junk(tmp_path: Path) -> None:
    rows = shoe_rows()
    with pytest.raises(CatalogueError, match="UNIQUE"):
        write_catalogue(tmp_path / "c.sqlite", [rows[0], CatalogueRow(rows[1].product, SHOES, 0)])
    with pytest.raises(CatalogueError, match="UNIQUE"):
        write_catalogue(tmp_path / "c.sqlite", [rows[0], CatalogueRow(rows[0].product, SHOES, 1)])
    assert not list(tmp_path.iterdir())  # a failed write leaves nothing behind
    (tmp_path / "junk.sqlite").write_bytes(b"x" * 4096)
    with pytest.raises(CatalogueError, match="not a readable catalogue"):
        Catalogue.open(tmp_path / "junk.sqlite")
    with pytest.raises(CatalogueError, match="no catalogue file"):
        Catalogue.open(tmp_path / "absent.sqlite")


def test_check_catalogue(catalogue_path: Path) -> None:
    assert check_catalogue(catalogue_path, {SHOES: 5, BAGS: 1}) == []
    problems = check_catalogue(catalogue_path, {SHOES: 6})
    assert any("has 5 products (rows 0..4), its index 6 rows" in p for p in problems)
    assert any("'Apparel|Bags' has products but no index" in p for p in problems)
