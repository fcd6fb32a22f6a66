"""Name -> implementation registries, filled by decorators (samplers, strategies)."""

from __future__ import annotations

from collections.abc import Callable


def registrar(table: dict[str, Callable]) -> Callable[[str], Callable]:
    """A decorator factory: `@register(name)` stores the decorated object in `table`."""

    def register(name: str):
        def wrap(obj):
            table[name] = obj
            return obj

        return wrap

    return register
