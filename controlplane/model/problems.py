"""pydantic validation errors as sentences a user can act on: the field's path, then what is wrong.

One wording for every object we validate: our CRDs (as status conditions) and the Kubernetes
objects a manifest file holds (as the file's error).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError


def explain(error: ValidationError, prefix: str) -> list[str]:
    """One sentence per problem, each naming the field under `prefix` (such as "spec")."""
    return [_sentence(problem, prefix) for problem in error.errors()]


def _sentence(problem: Mapping[str, Any], prefix: str) -> str:
    where = (prefix + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in problem["loc"])).lstrip(".")
    if problem["type"] == "extra_forbidden":
        return f"{where}: unknown field; check its spelling against the CRD (kubectl explain)"
    return f"{where}: {problem['msg'].removeprefix('Value error, ')}"
