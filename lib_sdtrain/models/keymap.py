"""Renaming state-dict keys between two module layouts by prefix tables.

A `PrefixMap` is a list of (a_prefix, b_prefix, inner) rules: a key `a_prefix.rest` becomes `b_prefix.rest'`,
where `rest'` is `rest` with its leading segments renamed by `inner` (e.g. diffusers' resnet `norm1` is LDM's
`in_layers.0`). The longest matching prefix wins, and the same table converts in both directions, so the
loader and the saver can never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefixMap:
    rules: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def add(self, a: str, b: str, inner: dict[str, str] | None = None) -> None:
        self.rules.append((a, b, inner or {}))

    def _convert(self, key: str, forward: bool) -> str | None:
        best = None
        for a, b, inner in self.rules:
            src, dst = (a, b) if forward else (b, a)
            if (key == src or key.startswith(src + ".")) and (best is None or len(src) > len(best[0])):
                best = (src, dst, inner)
        if best is None:
            return None
        src, dst, inner = best
        rest = key[len(src) + 1:]
        table = inner if forward else {v: k for k, v in inner.items()}
        for old in sorted(table, key=len, reverse=True):
            if rest == old or rest.startswith(old + "."):
                rest = table[old] + rest[len(old):]
                break
        return f"{dst}.{rest}" if rest else dst

    def a_to_b(self, key: str) -> str | None:
        """Rename a key of layout A; None if no rule covers it."""
        return self._convert(key, True)

    def b_to_a(self, key: str) -> str | None:
        return self._convert(key, False)
