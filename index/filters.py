"""The `filter` language of /recommend: Google Product Search's `key=value` syntax, extended with numbers.

    brand=acme AND (color=red OR color="dark blue") AND price<=80 AND NOT in_stock=false

Comparisons are `key=value` and `key!=value` for `brand` and any label key (case-insensitive), `<`, `<=`,
`>`, `>=` as well for `price`, and `in_stock=true|false`; `AND` binds tighter than `OR`, `NOT` tighter
than both, parentheses group. Values are bare words, numbers or quoted strings ("New York").

The logic is two-valued on purpose: a product without a price matches no price comparison, so
`NOT price<=80` includes it, and `key!=value` is exactly `NOT key=value`. `to_sql` writes every test so
that it is never SQL NULL, and `matches` (the pure-Python oracle) follows the same rules.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, TypeAlias

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from index.errors import ArtifactError
from training.data.products import Product
from training.errors import EXIT_INPUT

LOG = logging.getLogger(__name__)

Op = Literal["=", "!=", "<", "<=", ">", ">="]
Value: TypeAlias = str | float | bool
BUILTIN_KEYS = frozenset({"brand", "price", "in_stock"})
EQUALITY_OPS: frozenset[str] = frozenset({"=", "!="})
# Filters arrive in query strings from anyone: bound the work one can ask for (parse, SQL size, recursion).
MAX_FILTER_LENGTH = 2000
MAX_DEPTH = 32
NUMBER_PATTERN = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")

# LALR with lark's contextual lexer: after an operator only value tokens are expected, so a bare value may
# look like a key or a keyword (`brand=and`), and `nothing=1` is a key because KEY matches it whole.
GRAMMAR = r"""
?start: or_expr
?or_expr: and_expr (_OR and_expr)*
?and_expr: not_expr (_AND not_expr)*
?not_expr: _NOT not_expr -> negation
         | atom
?atom: comparison
     | _LPAR or_expr _RPAR
comparison: KEY OP (WORD | STRING)

_OR: "or"i
_AND: "and"i
_NOT: "not"i
_LPAR: "("
_RPAR: ")"
KEY: /[a-z][a-z0-9_]*/i
OP: "!=" | "<=" | ">=" | "=" | "<" | ">"
WORD: /[^\s()"'=!<>]+/
STRING: /"(\\.|[^"\\])*"/ | /'(\\.|[^'\\])*'/

%import common.WS
%ignore WS
"""

# Terminal names in lark's errors, as a reader of the message would call them.
_EXPECTED_NAMES = {
    "KEY": "a key", "OP": "an operator (=, !=, <, <=, >, >=)", "WORD": "a value", "STRING": "a value",
    "_AND": "AND", "_OR": "OR", "_NOT": "NOT", "_LPAR": "'('", "_RPAR": "')'", "$END": "the end",
}


class FilterError(ArtifactError, ValueError):
    """A filter expression cannot be used; the service answers 400 with the message."""

    exit_code = EXIT_INPUT  # the caller's input is wrong, nothing about the artifact


class FilterSyntaxError(FilterError):
    """The expression is malformed; `position` is the 1-based character where it goes wrong."""

    def __init__(self, position: int, problem: str) -> None:
        super().__init__(f"filter syntax error at position {position}: {problem}")
        self.position = position
        self.problem = problem


class UnknownFilterKey(FilterError):
    """A key is neither built in nor a label key of the catalogue; the message lists the known keys."""

    def __init__(self, key: str, position: int, known: Iterable[str]) -> None:
        self.key, self.position, self.known = key, position, sorted(known)
        super().__init__(f"unknown filter key {key!r} at position {position}; known keys: {', '.join(self.known)}")


@dataclass(frozen=True)
class Compare:
    """`key op value`: value is a casefolded str (brand, labels), a float (price) or a bool (in_stock)."""

    key: str
    op: Op
    value: Value


@dataclass(frozen=True)
class And:
    terms: tuple[Filter, ...]


@dataclass(frozen=True)
class Or:
    terms: tuple[Filter, ...]


@dataclass(frozen=True)
class Not:
    term: Filter


Filter: TypeAlias = Compare | And | Or | Not


def fold(text: str) -> str:
    """The one case-insensitive form, used for stored values and filter values alike."""
    return text.casefold()


def _unquote(token: Token) -> str:
    if token.type != "STRING":
        return str(token)
    return re.sub(r"\\(.)", r"\1", str(token)[1:-1])


@v_args(inline=True)
class _ToFilter(Transformer):
    """Lark tree -> typed `Filter`, checking each comparison's key, operator and value."""

    def __init__(self, known_keys: frozenset[str]) -> None:
        super().__init__()
        self.known_keys = known_keys

    def comparison(self, key_token: Token, op_token: Token, value_token: Token) -> Compare:
        key, op = str(key_token).lower(), str(op_token)
        if key not in self.known_keys:
            raise UnknownFilterKey(key, key_token.start_pos + 1, self.known_keys)
        text = _unquote(value_token)
        op_position, value_position = op_token.start_pos + 1, value_token.start_pos + 1
        if key == "price":
            if value_token.type != "WORD" or not NUMBER_PATTERN.match(text):
                raise FilterSyntaxError(value_position, f"price takes a number, got {str(value_token)!r}")
            number = float(text)
            if number in (float("inf"), float("-inf")):
                raise FilterSyntaxError(value_position, f"price takes a finite number, got {text!r}")
            return Compare(key, op, number)  # type: ignore[arg-type]  # OP only lexes the six operators
        if op not in EQUALITY_OPS:
            raise FilterSyntaxError(op_position, f"{op!r} works with price only; {key} takes = or !=")
        if key == "in_stock":
            if fold(text) not in ("true", "false"):
                raise FilterSyntaxError(value_position, f"in_stock takes true or false, got {str(value_token)!r}")
            return Compare(key, op, fold(text) == "true")  # type: ignore[arg-type]
        return Compare(key, op, fold(text))  # type: ignore[arg-type]

    def and_expr(self, *terms: Filter) -> And:
        return And(tuple(terms))

    def or_expr(self, *terms: Filter) -> Or:
        return Or(tuple(terms))

    def negation(self, term: Filter) -> Not:
        return Not(term)


@lru_cache(maxsize=1)
def _parser() -> Lark:
    # Built once: compiling the LALR tables costs a few ms, parsing a filter costs microseconds.
    return Lark(GRAMMAR, parser="lalr", lexer="contextual", propagate_positions=False, maybe_placeholders=False)


def _expected(names: Iterable[str]) -> str:
    readable = sorted({_EXPECTED_NAMES.get(name, name) for name in names})
    return " or ".join(readable) if readable else "something else"


def _syntax_error(text: str, error: UnexpectedInput) -> FilterSyntaxError:
    if isinstance(error, UnexpectedEOF):
        return FilterSyntaxError(len(text) + 1, f"unexpected end of filter; expected {_expected(error.expected)}")
    if isinstance(error, UnexpectedToken):
        position = (error.token.start_pos or 0) + 1 if error.token.type != "$END" else len(text) + 1
        found = "end of filter" if error.token.type == "$END" else repr(str(error.token))
        return FilterSyntaxError(position, f"unexpected {found}; expected {_expected(error.expected)}")
    if isinstance(error, UnexpectedCharacters):
        allowed = error.allowed or set()
        return FilterSyntaxError(error.pos_in_stream + 1,
                                 f"unexpected character {text[error.pos_in_stream]!r}; expected {_expected(allowed)}")
    return FilterSyntaxError(getattr(error, "pos_in_stream", 0) + 1, str(error).splitlines()[0])


def parse_filter(text: str, known_keys: Iterable[str]) -> Filter:
    """A typed `Filter` for `text`; FilterSyntaxError naming the position, or UnknownFilterKey listing keys.

    `known_keys` are the label keys of the catalogue (the built-in brand, price, in_stock always count).
    """
    if len(text) > MAX_FILTER_LENGTH:
        raise FilterSyntaxError(MAX_FILTER_LENGTH + 1, f"filter longer than {MAX_FILTER_LENGTH} characters")
    if not text.strip():
        raise FilterSyntaxError(1, "empty filter")
    keys = frozenset(known_keys) | BUILTIN_KEYS
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as exc:
        raise _syntax_error(text, exc) from None
    except LarkError as exc:  # anything else lark raises is still the input's fault
        raise FilterSyntaxError(1, str(exc).splitlines()[0]) from None
    # Parentheses nest in the lark tree and the transformer recurses: refuse deep nesting before walking it.
    if _tree_depth(tree) > MAX_DEPTH:
        raise FilterSyntaxError(1, f"filter nested deeper than {MAX_DEPTH} levels")
    try:
        result: Filter = _ToFilter(keys).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, FilterError):
            raise exc.orig_exc from None
        raise
    return result


def _tree_depth(tree: object) -> int:
    deepest, stack = 0, [(tree, 1)]
    while stack:
        current, level = stack.pop()
        deepest = max(deepest, level)
        for child in getattr(current, "children", ()):
            stack.append((child, level + 1))
    return deepest


def mentions(node: Filter | None, key: str) -> bool:
    """Whether any comparison in the filter uses `key` (e.g. so the in_stock default stands aside)."""
    if node is None:
        return False
    if isinstance(node, Compare):
        return node.key == key
    if isinstance(node, Not):
        return mentions(node.term, key)
    return any(mentions(term, key) for term in node.terms)


def keys_of(node: Filter) -> set[str]:
    """Every key the filter compares."""
    if isinstance(node, Compare):
        return {node.key}
    if isinstance(node, Not):
        return keys_of(node.term)
    return set().union(*(keys_of(term) for term in node.terms))


_SQL_OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">="}


def _compare_sql(node: Compare) -> tuple[str, list[object]]:
    if node.key == "price":
        if node.op in EQUALITY_OPS:
            sql = "(price IS NOT NULL AND price = ?)"
            return (sql if node.op == "=" else f"(NOT {sql})"), [node.value]
        return f"(price IS NOT NULL AND price {_SQL_OPS[node.op]} ?)", [node.value]
    if node.key == "in_stock":
        sql = "(in_stock IS ?)"  # IS, not =: an unknown stock (NULL) is simply not equal
        params: list[object] = [1 if node.value else 0]
    elif node.key == "brand":
        sql, params = "(brand_lc IS ?)", [node.value]
    else:
        sql = ("EXISTS (SELECT 1 FROM labels WHERE labels.product_id = products.id"
               " AND labels.key = ? AND labels.value_lc = ?)")
        params = [node.key, node.value]
    return (sql if node.op == "=" else f"(NOT {sql})"), params


def to_sql(node: Filter) -> tuple[str, list[object]]:
    """A WHERE condition over the catalogue's `products` table (labels via a subquery), and its parameters.

    Every part is 0 or 1, never NULL, so NOT and != keep their two-valued meaning.
    """
    if isinstance(node, Compare):
        return _compare_sql(node)
    if isinstance(node, Not):
        sql, params = to_sql(node.term)
        return f"(NOT {sql})", params
    parts = [to_sql(term) for term in node.terms]
    joiner = " AND " if isinstance(node, And) else " OR "
    return "(" + joiner.join(sql for sql, _ in parts) + ")", [param for _, values in parts for param in values]


def matches(node: Filter, product: Product) -> bool:
    """Whether `product` passes the filter: the plain-Python meaning that `to_sql` must agree with."""
    if isinstance(node, And):
        return all(matches(term, product) for term in node.terms)
    if isinstance(node, Or):
        return any(matches(term, product) for term in node.terms)
    if isinstance(node, Not):
        return not matches(node.term, product)
    if node.key == "price":
        if product.price is None:
            hit = False
        else:
            price, value = product.price, float(node.value)
            hit = {"=": price == value, "!=": price == value, "<": price < value, "<=": price <= value,
                   ">": price > value, ">=": price >= value}[node.op]
        return not hit if node.op == "!=" else hit
    if node.key == "in_stock":
        hit = product.in_stock is not None and product.in_stock == node.value
    elif node.key == "brand":
        hit = product.brand is not None and fold(product.brand) == node.value
    else:
        hit = any(fold(value) == node.value for value in product.labels.get(node.key, ()))
    return not hit if node.op == "!=" else hit
