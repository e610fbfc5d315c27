"""The reproduction matrices in configs/matrix: each reference study at full scale and a
`-cpu` twin with the same design at tiny scale (docs/studies.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from steps.plan import catalog
from steps.plan.matrix import expand, parse_matrix

MATRICES = Path(__file__).resolve().parents[1] / "configs" / "matrix"
TWINS = sorted(MATRICES.glob("study*-cpu.yaml"))


def load(path: Path):
    return parse_matrix(yaml.safe_load(path.read_text()), str(path))


def full_scale(twin: Path) -> list[Path]:
    study = twin.name.split("-")[0]
    return sorted(p for p in MATRICES.glob(f"{study}-*.yaml") if not p.name.endswith("-cpu.yaml"))


def axis_values(spec, axis: str) -> set:
    """Values of an axis across the matrix and its include rules (the design)."""
    values = set(getattr(spec, axis))
    for rule in spec.include:
        values |= set(getattr(rule, axis) or [])
    return values


def test_every_reference_study_has_a_twin_pair():
    assert [p.name.split("-")[0] for p in TWINS] == ["study1", "study2", "study3", "study4", "study5"]


@pytest.mark.parametrize("twin", TWINS, ids=lambda p: p.stem)
def test_twin_has_the_design_of_its_full_scale_study(twin):
    small = load(twin)
    fulls = [load(p) for p in full_scale(twin)]
    assert fulls, f"{twin.name} has no full-scale matrix"
    local = {n for n, i in catalog.instances().items() if i.local}
    assert axis_values(small, "instance") <= local  # runs here
    for big in fulls:
        assert not axis_values(big, "instance") & local  # GPU instances
        assert big.compute in ("kubernetes", "batch", "sagemaker")
        for axis in ("peft", "strategy", "precision"):
            twin_values, full_values = axis_values(small, axis), axis_values(big, axis)
            if axis == "precision" and len(full_values) == 1:
                continue  # not an axis of the study: the twin may train in fp32 (the CPU's fastest)
            assert twin_values == full_values, (axis, twin.name)
        for axis in ("lr", "micro_batch", "gpus", "models"):  # a sweep stays a sweep
            assert (len(axis_values(small, axis)) > 1) == (len(axis_values(big, axis)) > 1), (axis, twin.name)
    cells = [p for p in expand(small) if not p.refused]
    assert len(cells) == len(expand(small))  # nothing the twin asks for is refused
    assert max(c.cell.world_size for c in cells) <= 4 and len(cells) <= 28  # small enough for a CPU
