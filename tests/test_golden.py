"""Golden tests: a directory of manifests in, Envoy resources and conditions out, as YAML.

Each tests/golden/<case>/ holds manifests; tests/golden/<case>.expected.yaml holds what every
node group gets and every object's conditions. Regenerate with `pytest --update-golden`, then
read the diff: it is the review of the change.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from controlplane.sources.files import DirectorySource
from controlplane.translate import render, to_ir, to_xds

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(path.name for path in GOLDEN.iterdir() if path.is_dir())


def rendered(case: str) -> str:
    source = DirectorySource(GOLDEN / case)
    source.load()
    assert not source.errors, source.errors
    translation = to_ir.translate(source.store().view())
    document = {
        "nodeGroups": {name: render.resources_document(to_xds.snapshot(group))
                       for name, group in translation.groups.items()},
        "conditions": {str(key): [f"{c.type}={c.status} {c.reason}: {c.message}" for c in conditions]
                       for key, conditions in sorted(translation.conditions.items())},
    }
    return yaml.safe_dump(document, sort_keys=False, width=120)


@pytest.mark.parametrize("case", CASES)
def test_golden(case, request):
    expected = GOLDEN / f"{case}.expected.yaml"
    output = rendered(case)
    if request.config.getoption("--update-golden"):
        expected.write_text(output)
    assert expected.exists(), f"no {expected.name}: run `pytest tests/test_golden.py --update-golden`"
    assert output == expected.read_text(), f"{case} changed: review, then `pytest --update-golden`"
