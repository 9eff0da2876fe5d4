"""A module only an untrusted child imports: the parent must never import it."""

from __future__ import annotations


class Thing:
    def __init__(self, value: int) -> None:
        self.value = value
