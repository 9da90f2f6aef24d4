"""Registries of named, swappable parts: connectors, decoder FFNs, model families.

A part is registered once, next to its code, with the dataclass of its own options; the config
accepts any registered name and parses that part's options with its dataclass. Registration
happens when the module that defines the part is imported, so each registry names its provider
module and imports it on the first lookup: `mm1.config` stays free of torch at import time and
still knows every built-in name when it validates (see docs/design.md). This module imports
nothing of mm1.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    value: Any  # what the part is made from: a module class, a builder, a family spec
    config: type | None = None  # the dataclass of the part's options (None: no options)


class Registry:
    """Names -> entries of one kind of part; `provider` is the module (or modules) that register
    the built-in entries, imported on the first lookup."""

    def __init__(self, kind: str, provider: str | tuple[str, ...]) -> None:
        self.kind = kind
        self.providers = (provider,) if isinstance(provider, str) else provider
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, config: type | None = None) -> Callable[[Any], Any]:
        """Decorator: `@CONNECTORS.register("mlp", MLPConnectorConfig)` on the part."""

        def wrap(value: Any) -> Any:
            if name in self._entries and self._entries[name].value is not value:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = Entry(name, value, config)
            return value

        return wrap

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self.providers:
                importlib.import_module(module)

    def get(self, name: str) -> Entry | None:
        self._load()
        return self._entries.get(name)

    def __getitem__(self, name: str) -> Entry:
        entry = self.get(name)
        if entry is None:
            raise KeyError(f"{name!r} is not a registered {self.kind}; {self.registered()}")
        return entry

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def registered(self) -> str:
        return f"registered: {', '.join(self.names())}"

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def configs(self) -> list[type]:
        self._load()
        return [e.config for e in self._entries.values() if e.config is not None]


CONNECTORS = Registry("connector", "mm1.models.connectors")
FFNS = Registry("ffn", ("mm1.models.decoder", "mm1.models.moe"))
FAMILIES = Registry(
    "model family",
    (
        "mm1.models.family",
        "mm1.models.fuyu",
        "mm1.models.emu2",
        "mm1.models.chameleon",
        "mm1.models.seed",
    ),
)
