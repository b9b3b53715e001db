"""Every compare spec shipped in benchmarks/compare validates (graft configs, fairness rules, names), so a
spec edited for one issue cannot break silently before its long run starts."""

from pathlib import Path

import pytest

from graftlm.compare.spec import load_compare_spec

SPECS = sorted((Path(__file__).parents[2] / "benchmarks" / "compare").glob("*.yaml"))


def test_specs_are_shipped():
    assert len(SPECS) >= 5


@pytest.mark.parametrize("path", SPECS, ids=[p.stem for p in SPECS])
def test_shipped_compare_spec_validates(path):
    spec = load_compare_spec(path)
    names = [system.name for system in spec.systems]
    assert spec.reference in names and len(set(names)) == len(names)
