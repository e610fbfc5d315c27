"""What each node of a cell's Slurm job runs (one task per node, under `srun`):

    python -m steps.flow.slurm.entry --cell CELL.yaml --out CELL_DIR

The same launcher as a local cell (`steps.flow.launcher.run_cell`: torchrun or DeepSpeed's
launcher, one process per device of this node, the same time limit and hang watch). Node 0
writes the cell's folder, node i its node<i>/ below it, as a SageMaker job's instances do; a
multi-node cell meets at MASTER_ADDR:MASTER_PORT, which the job script sets to the first node of
the allocation. The exit code is the trainer's: 0 when the cell is `ok`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from steps.flow import launcher
from steps.plan.schema import CellSpec


def node_place(env=os.environ) -> tuple[int, int]:
    """(this node's index, the job's node count), from Slurm's variables."""
    return int(env.get("SLURM_NODEID", 0)), int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cell = CellSpec.model_validate(yaml.safe_load(Path(args.cell).read_text()))
    node, nodes = node_place()
    out = Path(args.out) if node == 0 else Path(args.out) / f"node{node}"
    if nodes > 1:
        master, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    else:  # one node: its processes meet on loopback
        master, port = "127.0.0.1", launcher.free_port()
    print(f"finetune-matrix: cell {cell.cell_id}, Slurm job {os.environ.get('SLURM_JOB_ID', '?')} on "
          f"{os.environ.get('SLURMD_NODENAME', '?')} (node {node} of {nodes}), {cell.gpus} process(es), "
          f"master {master}:{port}", flush=True)
    m = launcher.run_cell(cell, out, echo=False, node_rank=node, master_addr=master, port=port,
                          resume=cell.train.checkpoint_every > 0)
    print(f"finetune-matrix: outcome {m.outcome}" + (f": {m.error}" if m.error else ""), flush=True)
    if m.outcome == "ok":
        return 0
    return m.exit_code if isinstance(m.exit_code, int) and m.exit_code > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
