"""Fan a fine-tuning matrix out into real training runs, one branch per cell, and compare them.

    python flows/finetune_matrix.py run                                   # the embedded default
    python flows/finetune_matrix.py --config matrix configs/matrix/X.yaml run
    python flows/finetune_matrix.py resume                                # re-run failed cells
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `steps`
# Metaflow refuses to run as "root" or with no user name (containers, CI): give it one.
if all(os.environ.get(v) in (None, "", "root") for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
    os.environ["METAFLOW_USER"] = "finetune-matrix"

from metaflow import Config, FlowSpec, card, current, step  # noqa: E402

from steps import runs  # noqa: E402


class FinetuneMatrixFlow(FlowSpec):
    """start: validate + expand -> train (one per cell) -> join: table + report -> end: card."""

    matrix = Config("matrix", default=str(runs.DEFAULT_MATRIX),
                    parser="steps.matrix.parse_matrix_text", help="matrix YAML file")

    @step
    def start(self):
        self.cells = runs.plan(self.matrix)
        print(f"{len(self.cells)} cells; results go to {runs.run_dir(current.run_id)}")
        self.next(self.train, foreach="cells")

    @step
    def train(self):
        self.cell = self.input["cell"]
        self.metrics = runs.train_cell(self.input, runs.run_dir(current.run_id))
        self.next(self.join)

    @step
    def join(self, inputs):
        meta = runs.provenance(current.run_id, current.flow_name, self.matrix)
        self.results, self.paths = runs.join(
            current.run_id, [(i.cell, i.metrics) for i in inputs], runs.run_dir(current.run_id), meta)
        self.provenance = meta
        self.next(self.end)

    @card(type="blank")
    @step
    def end(self):
        from metaflow.cards import Markdown

        current.card.append(Markdown(Path(self.paths["report"]).read_text()))
        print(f"results: {self.paths['parquet']}\nreport:  {self.paths['report']}")


if __name__ == "__main__":
    FinetuneMatrixFlow()
