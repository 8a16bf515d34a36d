"""Category names as clients send them: a full STL path or its short name (the last path part)."""

from __future__ import annotations

from collections.abc import Iterable

from training.data.stl import short_name


class UnknownCategory(KeyError):
    """The name matches no category, or several; the message lists what would work."""

    def __str__(self) -> str:  # KeyError's str() adds quotes around the message
        return str(self.args[0])


class CategoryResolver:
    """The same resolution rules as `training.data.stl.CategoryMap.resolve`, over a list of paths."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths: list[str] = sorted(set(paths))
        self._by_short: dict[str, list[str]] = {}
        for path in self.paths:
            self._by_short.setdefault(short_name(path), []).append(path)

    def display_name(self, path: str) -> str:
        name = short_name(path)
        return name if len(self._by_short.get(name, [])) == 1 else path

    def names(self) -> list[str]:
        return [self.display_name(path) for path in self.paths]

    def resolve(self, name: str) -> str:
        name = name.strip()
        if name in self.paths:
            return name
        matches = self._by_short.get(name, [])
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise UnknownCategory(f"category {name!r} is ambiguous; use one of the full paths: {matches}")
        raise UnknownCategory(f"unknown category {name!r}; known categories: {self.names()}")
