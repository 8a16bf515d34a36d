"""The filter language: parse results, error positions, unknown keys, and SQL that agrees with the oracle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from index.catalogue import Catalogue, CatalogueRow, write_catalogue
from index.filters import (
    MAX_DEPTH,
    And,
    Compare,
    FilterSyntaxError,
    Not,
    Or,
    UnknownFilterKey,
    keys_of,
    matches,
    mentions,
    parse_filter,
    to_sql,
)
from training.data.products import Product

LABEL_KEYS = {"color", "size", "material"}
CATEGORY = "Apparel|Shoes"


def test_parses_precedence_values_and_case() -> None:
    parsed = parse_filter('Brand=ACME and (color=red OR color="Dark Blue") AND price<=80 or not in_stock=false',
                          LABEL_KEYS)
    assert parsed == Or((
        And((Compare("brand", "=", "acme"),
             Or((Compare("color", "=", "red"), Compare("color", "=", "dark blue"))),
             Compare("price", "<=", 80.0))),
        Not(Compare("in_stock", "=", False)),
    ))
    assert parse_filter("size=42", LABEL_KEYS) == Compare("size", "=", "42")  # labels compare as text
    assert parse_filter("price > -1.5e1", LABEL_KEYS) == Compare("price", ">", -15.0)
    assert parse_filter(r"color='it\'s'", LABEL_KEYS) == Compare("color", "=", "it's")
    assert parse_filter("color=and", LABEL_KEYS) == Compare("color", "=", "and")  # a value, not the keyword


@pytest.mark.parametrize(("text", "position", "problem"), [
    ("color=", 7, "unexpected end of filter"),
    ("color=red AND", 14, "unexpected end of filter"),
    ("(color=red", 11, "expected ')'"),
    ("color=red)", 10, "unexpected ')'"),
    ("color=red size=38", 11, "unexpected 'size'"),
    ("color red", 7, "unexpected 'red'"),
    ("=red", 1, "unexpected '='"),
    ('color="open', 7, "unexpected character '\"'"),
    ("color<red", 6, "works with price only"),
    ("price=cheap", 7, "price takes a number"),
    ("price<=1e999", 8, "finite number"),
    ('price="80"', 7, "price takes a number"),
    ("in_stock=maybe", 10, "in_stock takes true or false"),
    ("in_stock>true", 9, "works with price only"),
    ("   ", 1, "empty filter"),
])
def test_syntax_errors_name_the_position(text: str, position: int, problem: str) -> None:
    with pytest.raises(FilterSyntaxError) as error:
        parse_filter(text, LABEL_KEYS)
    assert error.value.position == position
    assert f"at position {position}: " in str(error.value)
    assert problem in str(error.value)


def test_unknown_key_lists_the_known_ones() -> None:
    with pytest.raises(UnknownFilterKey) as error:
        parse_filter("color=red AND colour=blue", LABEL_KEYS)
    assert error.value.key == "colour" and error.value.position == 15
    assert "brand, color, in_stock, material, price, size" in str(error.value)


def test_deep_nesting_and_long_filters_are_refused() -> None:
    with pytest.raises(FilterSyntaxError, match="nested deeper"):
        parse_filter("NOT " * (MAX_DEPTH + 1) + "color=red", LABEL_KEYS)
    with pytest.raises(FilterSyntaxError, match="longer than"):
        parse_filter("color=red OR " * 400 + "color=red", LABEL_KEYS)
    assert parse_filter("(" * 200 + "color=red" + ")" * 200, LABEL_KEYS) == Compare("color", "=", "red")


def test_mentions_and_keys() -> None:
    parsed = parse_filter("color=red OR NOT (in_stock=true AND price<3)", LABEL_KEYS)
    assert mentions(parsed, "in_stock") and mentions(parsed, "price") and not mentions(parsed, "brand")
    assert not mentions(None, "in_stock")
    assert keys_of(parsed) == {"color", "in_stock", "price"}


def test_oracle_two_valued_logic() -> None:
    bare = Product("p0")
    red = Product("p1", brand="Acme", price=80.0, in_stock=True, labels={"color": ("Red", "blue")})
    assert matches(parse_filter("NOT price<=80", LABEL_KEYS), bare)  # no price: no price comparison holds
    assert not matches(parse_filter("price<=80", LABEL_KEYS), bare)
    assert matches(parse_filter("color!=red", LABEL_KEYS), bare)
    assert not matches(parse_filter("color!=red", LABEL_KEYS), red)
    assert matches(parse_filter("color=RED AND color=Blue AND brand=acme", LABEL_KEYS), red)
    assert not matches(parse_filter("in_stock=false", LABEL_KEYS), bare)
    assert matches(parse_filter("in_stock!=true", LABEL_KEYS), bare)


# ---- property tests ---------------------------------------------------------------------------------

BRANDS = [None, "Acme", "ACME", "Zed", "New York"]
PRICES = [None, 0.0, 10.0, 49.5, 80.0, 120.0]
LABEL_VALUES = {"color": ["red", "Red", "blue", "dark blue"], "size": ["38", "39", "40"], "material": ["leather"]}


def random_products(count: int, seed: int) -> list[Product]:
    rng = random.Random(seed)
    products = []
    for number in range(count):
        labels = {key: tuple(dict.fromkeys(rng.sample(values, rng.randint(1, len(values)))))
                  for key, values in LABEL_VALUES.items() if rng.random() < 0.7}
        products.append(Product(f"p{number}", brand=rng.choice(BRANDS), price=rng.choice(PRICES),
                                in_stock=rng.choice([True, False, None]), labels=labels))
    return products


@pytest.fixture(scope="module")
def random_catalogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Product], Catalogue]:
    products = random_products(80, seed=3)
    path = Path(tmp_path_factory.mktemp("catalogue")) / "catalogue.sqlite"
    write_catalogue(path, [CatalogueRow(product, CATEGORY, row) for row, product in enumerate(products)])
    catalogue = Catalogue.open(path)
    yield products, catalogue
    catalogue.close()


def quoted(value: str) -> str:
    return f'"{value}"' if " " in value or value.lower() in ("and", "or", "not") else value


def comparisons() -> st.SearchStrategy[str]:
    label = st.sampled_from(sorted(LABEL_VALUES)).flatmap(
        lambda key: st.tuples(st.just(key), st.sampled_from(["=", "!="]),
                              st.sampled_from(LABEL_VALUES[key] + ["RED", "none"])))
    brand = st.tuples(st.just("brand"), st.sampled_from(["=", "!="]),
                      st.sampled_from(["acme", "Zed", "New York", "other"]))
    price = st.tuples(st.just("price"), st.sampled_from(["=", "!=", "<", "<=", ">", ">="]),
                      st.sampled_from(["0", "10", "49.5", "80", "1e2", "-1"]))
    stock = st.tuples(st.just("in_stock"), st.sampled_from(["=", "!="]), st.sampled_from(["true", "FALSE"]))
    return st.one_of(label, brand, price, stock).map(lambda c: f"{c[0]}{c[1]}{quoted(c[2])}")


def expressions() -> st.SearchStrategy[str]:
    def extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        keyword = st.sampled_from(["AND", "OR", "and", "Or"])
        return st.one_of(
            st.tuples(inner, keyword, inner).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
            inner.map(lambda e: f"NOT {e}"),
            inner.map(lambda e: f"( {e} )"),
        )
    return st.recursive(comparisons(), extend, max_leaves=8)


# No example database: runs stay reproducible and leave no .hypothesis folder in the checkout.
FAST = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(text=expressions())
def test_sql_agrees_with_the_oracle(random_catalogue: tuple[list[Product], Catalogue], text: str) -> None:
    products, catalogue = random_catalogue
    parsed = parse_filter(text, catalogue.label_keys())
    expected = [row for row, product in enumerate(products) if matches(parsed, product)]
    # The columns (what allowed_rows evaluates) and the SQL (what the popularity fallback runs) both agree.
    assert catalogue.allowed_rows(CATEGORY, parsed, default_in_stock=False).tolist() == expected
    where, params = to_sql(parsed)
    found = catalogue._connection().execute(f"SELECT row FROM products WHERE {where} ORDER BY row", params)
    assert [row for (row,) in found] == expected


TOKENS = ["color", "brand", "price", "in_stock", "colour", "=", "!=", "<", "<=", ">", ">=", "AND", "OR", "NOT",
          "(", ")", "red", '"dark blue"', '"', "'", "80", "1e999", "nan", "true", "-", "\\", "é", "\n"]


@FAST
@given(soup=st.one_of(st.lists(st.sampled_from(TOKENS), max_size=12).map(" ".join),
                      st.lists(st.sampled_from(TOKENS), max_size=12).map("".join),
                      st.text(max_size=40)))
def test_any_text_parses_or_raises_a_filter_error(soup: str) -> None:
    try:
        parsed = parse_filter(soup, LABEL_KEYS)
    except FilterSyntaxError as error:
        assert 1 <= error.position <= len(soup) + 1
    except UnknownFilterKey as error:
        assert error.key not in LABEL_KEYS
    else:
        assert isinstance(parsed, (Compare, And, Or, Not))
