"""Components by name: routers, executors, attention routers, pruning methods, ...

A family keeps one :class:`Registry` per kind of component; ``register(name)`` is a decorator,
``get(name)`` of an unknown name raises ValueError listing the known ones.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

__all__ = ["Registry"]

T_co = TypeVar("T_co")


class Registry(Generic[T_co]):
    """Components by name. ``get`` of an unknown name raises ValueError listing the known names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T_co] = {}

    def register(self, name: str) -> Callable[[T_co], T_co]:
        def deco(obj: T_co) -> T_co:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T_co:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self._items))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
