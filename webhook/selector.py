"""Kubernetes label selectors (matchLabels and matchExpressions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class InjectionConfigError(ValueError):
    """The injection settings (flags, the injection config file) cannot work; the message says which."""


_OPERATORS = {"In", "NotIn", "Exists", "DoesNotExist"}


@dataclass(frozen=True, slots=True)
class LabelSelector:
    match_labels: tuple[tuple[str, str], ...] = ()
    match_expressions: tuple[tuple[str, str, tuple[str, ...]], ...] = ()

    @classmethod
    def parse(cls, doc: Any, where: str) -> LabelSelector:
        if not isinstance(doc, dict) or set(doc) - {"matchLabels", "matchExpressions"}:
            raise InjectionConfigError(f"{where}: a label selector has matchLabels and/or matchExpressions")
        labels = doc.get("matchLabels") or {}
        expressions = []
        for e in doc.get("matchExpressions") or []:
            if not isinstance(e, dict) or e.get("operator") not in _OPERATORS or not e.get("key"):
                raise InjectionConfigError(
                    f"{where}: matchExpressions need key and operator ({' | '.join(sorted(_OPERATORS))})"
                )
            expressions.append((str(e["key"]), str(e["operator"]), tuple(str(v) for v in e.get("values") or ())))
        return cls(tuple(sorted((str(k), str(v)) for k, v in labels.items())), tuple(expressions))

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels):
            return False
        for key, op, values in self.match_expressions:
            present = key in labels
            if op == "In" and not (present and labels[key] in values):
                return False
            if op == "NotIn" and present and labels[key] in values:
                return False
            if op == "Exists" and not present:
                return False
            if op == "DoesNotExist" and present:
                return False
        return True
