"""Fan a fine-tuning matrix out into real training runs, one branch per cell, and compare them.

    python flows/finetune_matrix.py run                                   # the embedded default
    python flows/finetune_matrix.py --config matrix configs/matrix/X.yaml run
    python flows/finetune_matrix.py resume                                # re-run failed cells
"""

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's `steps`
# Metaflow refuses to run as "root" or with no user name (containers, CI): give it one.
if all(os.environ.get(v) in (None, "", "root") for v in ("METAFLOW_USER", "SUDO_USER", "USERNAME", "USER")):
    os.environ["METAFLOW_USER"] = "finetune-matrix"
# Metaflow's local @parallel starts the other nodes' tasks with `python` from PATH: make that
# this interpreter (a virtual environment that is not activated would not be found).
_python = Path(sys.executable).parent / "python"
if _python.exists() and shutil.which("python") != str(_python):
    os.environ["PATH"] = os.pathsep.join([str(_python.parent), os.environ.get("PATH", "")])

# A matrix's cells are its foreach: Metaflow's guard against a foreach of over 100 branches by
# mistake (--max-num-splits) would refuse ordinary matrices (5 models x 4 methods x 8 strategies
# is 160 cells) after their plan; `start` prints the count before any cell runs.
for _command in ("RUN", "RESUME"):
    os.environ.setdefault(f"METAFLOW_{_command}_MAX_NUM_SPLITS", "100000")

from steps.flow import priority  # noqa: E402

priority.for_this_process(sys.argv)  # Metaflow's tasks and card processes yield to the cells' ranks

from metaflow import Config, FlowSpec, card, current, parallel, step  # noqa: E402

from steps import CONFIGS_DIR, lazy_module  # noqa: E402
from steps.flow.compute import MatrixCompute  # noqa: E402
from steps.flow.problems import problems_last  # noqa: E402

# Loaded when a step first uses them: every process Metaflow starts loads this file, and its card
# processes (two or three a cell) use none of them (a third of a second of CPU each: the planner,
# pydantic, the schema).
cards = lazy_module("steps.flow.cards")
runs = lazy_module("steps.flow.tasks")
nodes = lazy_module("steps.results.nodes")


@MatrixCompute  # @retry/@catch and @kubernetes/@batch on `train`, from the matrix
class FinetuneMatrixFlow(FlowSpec):
    """start: plan -> launch (per cell) -> train (per node) -> gather: cell card -> join -> end."""

    matrix = Config("matrix", default=str(CONFIGS_DIR / "matrix" / "default.yaml"),
                    parser="steps.plan.matrix.parse_matrix_text", help="matrix YAML file")

    @step
    def start(self):
        """Expand the matrix (validated when the flow was loaded) into cells."""
        self.cells, self.skipped, self.planned_saving = runs.plan(self.matrix, current.run_id, current.flow_name)
        print(f"{len(self.cells)} cells to run, {len(self.skipped)} refused; results go to "
              f"{runs.run_dir(current.run_id)}")
        self.next(self.launch, foreach="cells")

    @step
    def launch(self):
        """One cell: as many @parallel tasks as it has nodes, sharing a rendezvous port."""
        self.cell, self.refused = self.input["cell"], self.input["refused"]
        self.economy = self.input.get("economy")  # its role under `economy:`, if the matrix has one
        self.nodes, self.port = runs.placement(self.input, self.matrix)
        self.next(self.train, num_parallel=self.nodes)

    @card(type="blank", id="live", refresh_interval=1)  # paced by cards.LiveCard
    @parallel
    @step
    def train(self):
        """This node's share of the cell under torchrun (or the cell's SageMaker job); a real
        failure fails the task."""
        self.node = current.parallel.node_index
        self.metrics, self.log = runs.train_node(
            {"cell": self.cell, "refused": self.refused, "economy": self.economy}, runs.run_dir(current.run_id),
            self.node, current.parallel.main_ip, self.port, self.matrix,
            (current.run_id, current.retry_count, current.origin_run_id), current.pathspec,
            current.card["live"] if hasattr(current, "card") else None, in_task=True)  # none in a dry run
        # a remote node's folder (adapter, log, metrics), for gather to put in this run's folder
        self.files = runs.node_files(self.matrix, runs.run_dir(current.run_id), self.cell, self.node)
        runs.fail_if_error(self.metrics, runs.run_dir(current.run_id), self.matrix, current.retry_count)
        self.next(self.gather)

    @card(type="blank", id="cell")
    @step
    def gather(self, inputs):
        """The cell's result (node 0 measures it), all nodes' logs, and the cell's card."""
        self.cell, self.planned_saving, self.skipped = inputs[0].cell, inputs[0].planned_saving, inputs[0].skipped
        self.metrics, self.log = nodes.gather([
            (i.node, getattr(i, "metrics", None), getattr(i, "log", ""), getattr(i, "failure", None))
            for i in inputs])
        runs.keep_node_files(runs.run_dir(current.run_id), self.cell,
                             [(i.node, getattr(i, "files", None)) for i in inputs])
        self.loss_curve = self.metrics.get("loss_curve", [])
        if hasattr(current, "card"):  # none in a dry run
            current.card["cell"].extend(cards.cell_card(self.cell, self.metrics))
        self.next(self.join)

    @step
    def join(self, inputs):
        """One results table (Parquet, CSV, artifact) and the report, under reports/<run id>/."""
        meta = runs.provenance(current.run_id, current.flow_name, self.matrix, inputs[0].planned_saving)
        self.results, self.paths, self.report_blocks = runs.join(
            current.run_id, [(i.cell, i.metrics) for i in inputs] + inputs[0].skipped, runs.run_dir(current.run_id),
            meta)
        self.provenance = meta
        self.next(self.end)

    @card(type="blank")
    @step
    def end(self):
        """The report as a card: the same findings, tables and figures as report.md/.html."""
        current.card.extend(runs.report_card(self.report_blocks, self.paths))
        print(f"results: {self.paths['parquet']}\nreport:  {self.paths['report']}\n"
              f"         {self.paths.get('html', '')}")


if __name__ == "__main__":
    with problems_last(sys.argv):
        FinetuneMatrixFlow()
