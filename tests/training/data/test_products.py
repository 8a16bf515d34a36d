"""products.jsonl and CSV exports: good records read into Products, bad ones named by file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.data.products import Product, ProductFormatError, read_products, write_products

GOOD_JSONL = [
    {"id": "p1", "title": "Red shoe", "brand": "Acme", "price": 49.5, "currency": "eur",
     "url": "https://shop.example/p1", "in_stock": True, "labels": {"color": "red", "size": ["38", "39", "38"]}},
    {"id": "p2"},
    {"id": "p-3", "price": 0, "in_stock": False, "labels": {"color": []}},
]


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_jsonl_reads_and_normalises(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "products.jsonl", [json.dumps(record) for record in GOOD_JSONL[:2]]
                       + ["", json.dumps(GOOD_JSONL[2])])
    first, second, third = read_products(path)
    assert first == Product("p1", "Red shoe", "Acme", 49.5, "EUR", "https://shop.example/p1", True,
                            {"color": ("red",), "size": ("38", "39")})
    assert second == Product("p2")
    assert third.price == 0.0 and third.in_stock is False and third.labels == {}


def test_write_then_read_round_trips(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "in.jsonl", [json.dumps(record) for record in GOOD_JSONL])
    products = read_products(path)
    write_products(tmp_path / "out.jsonl", products)
    assert read_products(tmp_path / "out.jsonl") == products
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp file left behind


@pytest.mark.parametrize(("line", "message"), [
    ('{"id": "p9", "price": 1', "malformed JSON"),
    ('["p9"]', "expected a JSON object"),
    ('{"title": "no id"}', "missing field 'id'"),
    ('{"id": "bad id"}', "invalid product id"),
    ('{"id": "p9", "price": -1}', "finite non-negative"),
    ('{"id": "p9", "price": "12"}', "price must be a number"),
    ('{"id": "p9", "price": true}', "price must be a number"),
    ('{"id": "p9", "in_stock": "yes"}', "in_stock must be true or false"),
    ('{"id": "p9", "labels": ["red"]}', "labels must be an object"),
    ('{"id": "p9", "labels": {"color": 3}}', "values must be strings"),
    ('{"id": "p9", "labels": {"color": ["red", 3]}}', "values must be strings"),
    ('{"id": "p9", "labels": {"Color": "red"}}', "lowercase letters"),
    ('{"id": "p9", "labels": {"price": "low"}}', "reserved"),
    ('{"id": "p9", "colour": "red"}', "unknown field"),
    ('{"id": "p9", "url": "javascript:alert(1)"}', "http:// or https://"),
    ('{"id": "p9", "currency": "euro"}', "ISO 4217"),
    ('{"id": "p1"}', "duplicate product id 'p1' (first on line 1)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "products.jsonl", ['{"id": "p1"}', "", line])
    with pytest.raises(ProductFormatError) as error:
        read_products(path)
    assert f"{path}:3: " in str(error.value)
    assert message in str(error.value)


def test_csv_reads_labels_and_booleans(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text(
        "\ufeffid,title,price,in_stock,label.color,label.size\n"
        'p1,"Shoe, red",49.5,yes,red,38|39\n'
        "\n"
        'p2,"Two\nlines",,0,,\n'
        "p3,,12,TRUE, Blue | Navy ,\n",
        encoding="utf-8")
    first, second, third = read_products(path)
    assert first == Product("p1", "Shoe, red", price=49.5, in_stock=True,
                            labels={"color": ("red",), "size": ("38", "39")})
    assert second == Product("p2", "Two\nlines", in_stock=False)
    assert third.in_stock is True and third.labels == {"color": ("Blue", "Navy")}


@pytest.mark.parametrize(("row", "message"), [
    ("p9,cheap,,", "price must be a number"),
    ("p9,-3,,", "finite non-negative"),
    ("p9,nan,,", "finite non-negative"),
    ("p9,1,maybe,", "in_stock must be one of"),
    ("bad id,1,,", "invalid product id"),
    (",1,,", "missing field 'id'"),
    ("p9,1,", "expected 4 cells, got 3"),
    ("p1,1,,", "duplicate product id 'p1' (first on line 2)"),
])
def test_csv_errors_name_the_record_line(tmp_path: Path, row: str, message: str) -> None:
    path = tmp_path / "export.csv"
    # Line 3 is a record spanning two lines: the bad record starts on line 5.
    path.write_text(f'id,price,in_stock,label.color\np1,1,true,red\np2,2,true,"re\nd"\n{row}\n', encoding="utf-8")
    with pytest.raises(ProductFormatError) as error:
        read_products(path)
    assert f"{path}:5: " in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize(("header", "message"), [
    ("title,price", "no 'id' column"),
    ("id,colour", "unknown column 'colour'"),
    ("id,label.Color", "lowercase letters"),
    ("id,label.brand", "reserved"),
    ("id,id", "duplicate column"),
])
def test_csv_header_errors_are_line_1(tmp_path: Path, header: str, message: str) -> None:
    path = tmp_path / "export.csv"
    path.write_text(header + "\n", encoding="utf-8")
    with pytest.raises(ProductFormatError, match=message) as error:
        read_products(path)
    assert str(error.value).startswith(f"{path}:1: ")


@pytest.mark.parametrize(("name", "content", "where"), [
    ("products.jsonl", b'{"id": "p1"}\n{"id": "caf\xe9"}\n', ":2: not UTF-8 text (byte 0xe9 at position 11)"),
    ("export.csv", b"id,title\np1,ok\np2,caf\xe9\n", ":3: not UTF-8 text (byte 0xe9 at position 6)"),
    ("export.csv", b"\xef\xbb\xbfid,ti\xfftle\np1,ok\n", ":1: not UTF-8 text (byte 0xff at position 5)"),
])
def test_bytes_that_are_not_utf8_name_file_and_line(tmp_path: Path, name: str, content: bytes, where: str) -> None:
    # The fuzzer's case: a Latin-1 export was a UnicodeDecodeError traceback with no line.
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ProductFormatError) as error:
        read_products(path)
    assert str(error.value) == f"{path}{where}"


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProductFormatError, match="unknown product file type"):
        read_products(tmp_path / "products.xml")
    with pytest.raises(ProductFormatError, match="no such product file"):
        read_products(tmp_path / "absent.jsonl")
