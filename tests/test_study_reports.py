"""The reports of the five reference-study CPU twins, rebuilt from their saved results tables
(`tests/data/study_twins/<matrix>/`: results.parquet and provenance.json as the runs wrote
them) must equal the saved report.md and decision.json to the byte. A change to the analysis, findings or
sections shows here as a diff to read; when it is meant, regenerate the files with

    python -m tests.test_study_reports
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from steps.report import build as report

TWINS = Path(__file__).resolve().parent / "data" / "study_twins"
NAMES = sorted(p.name for p in TWINS.iterdir())


def rebuilt(name: str, out: Path) -> str:
    assert report.main([str(TWINS / name), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    return re.sub(r"^- tables: `[^`]*`$", "- tables: `results.parquet`", md, flags=re.M)  # where this checkout is


def test_all_five_twins_are_kept():
    assert NAMES == ["study1-sagemaker-cpu", "study2-p4d-tensor-zero3-cpu", "study3-ddp-fsdp-naive-cpu",
                     "study4-litgpt-memory-cpu", "study5-parallelism-1b-cpu"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_twins_report_is_rebuilt_exactly(name, tmp_path):
    assert rebuilt(name, tmp_path) == (TWINS / name / "report.md").read_text()
    # and its decision, the contract other tools read
    assert (tmp_path / "decision.json").read_text() == (TWINS / name / "decision.json").read_text()


def test_the_spread_evidence_is_what_the_saved_twins_measure():
    """`steps/report/spread_evidence.json` (what an economy run states beside a shared value)
    is the largest class spread per precision on the twins' saved full runs, regenerated with
    `python -m steps.report.economy tests/data/study_twins/*/`."""
    from steps.report import economy

    found = economy.measure_evidence([TWINS / name for name in NAMES])
    assert found == economy.evidence()
    assert set(found) == {"bf16-mixed", "fp32"}
    assert all(0 <= entry["spread"] < 0.01 and entry["members"] >= 2 for entry in found.values())


if __name__ == "__main__":
    import tempfile

    for name in NAMES:
        with tempfile.TemporaryDirectory() as tmp:
            (TWINS / name / "report.md").write_text(rebuilt(name, Path(tmp)))
            (TWINS / name / "decision.json").write_text((Path(tmp) / "decision.json").read_text())
            print(f"wrote {TWINS / name / 'report.md'} and decision.json", file=sys.stderr)
