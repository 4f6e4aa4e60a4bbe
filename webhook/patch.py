"""original + mutated -> RFC 6902 JSONPatch, with RFC 6901 escaping. Pure.

Objects are diffed key by key; a list that only grew gets `add` operations at its end, any
other changed list is replaced whole (simple, and correct whatever the original held).
"""

from __future__ import annotations

from typing import Any

Op = dict[str, Any]


def diff(original: Any, mutated: Any, path: str = "") -> list[Op]:
    if original == mutated:
        return []
    if isinstance(original, dict) and isinstance(mutated, dict):
        ops: list[Op] = []
        for key in original:
            if key not in mutated:
                ops.append({"op": "remove", "path": f"{path}/{escape(key)}"})
        for key, value in mutated.items():
            child = f"{path}/{escape(key)}"
            if key not in original:
                ops.append({"op": "add", "path": child, "value": value})
            else:
                ops.extend(diff(original[key], value, child))
        return ops
    if isinstance(original, list) and isinstance(mutated, list) and mutated[: len(original)] == original:
        return [{"op": "add", "path": f"{path}/-", "value": item} for item in mutated[len(original) :]]
    return [{"op": "replace", "path": path or "", "value": mutated}]


def escape(key: str) -> str:
    """An RFC 6901 reference token: '~' -> '~0', '/' -> '~1'."""
    return str(key).replace("~", "~0").replace("/", "~1")
