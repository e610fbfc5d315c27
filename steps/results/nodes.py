"""One cell's result from its nodes: a cell over N nodes (Metaflow's @parallel tasks, a
SageMaker job's instances or a Slurm job's nodes) measures on node 0, and any failed node fails it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps.results.metrics import CellMetrics

# (node index, its metrics as a dict or None, its log, a failure @catch recorded or None)
Node = tuple[int, dict | None, str, Any]


def gather(nodes: list[Node]) -> tuple[dict[str, Any], str]:
    """Node 0's metrics (rank 0 measures the cell), every node's log, and a failure that @catch
    recorded (outcome `error` with its message)."""
    nodes = sorted(nodes, key=lambda n: n[0])
    _, first, _, failure = nodes[0]
    m = CellMetrics.from_dict(first) if first else CellMetrics(outcome="error")
    for index, other, _, other_failure in nodes[1:]:
        other = CellMetrics.from_dict(other) if other else None
        if m.outcome == "ok" and (other_failure or (other is not None and other.outcome == "error")):
            m.update(outcome="error", error=f"node {index} failed: {(other and other.error) or other_failure}")
    if failure is not None and m.outcome in ("ok", "error"):
        m.update(outcome="error",
                 error=m.error or str(getattr(failure, "exception", failure)).strip().splitlines()[-1])
    log = "".join(text if i == 0 else f"\n===== node {i} =====\n{text}" for i, _, text, _ in nodes)
    return m.to_dict(), log


def read_nodes(out_dir: Path) -> list[Node]:
    """What each node of a job wrote (node 0 in the cell folder, others in node<i>/), in the
    shape `gather` combines, as for @parallel nodes."""
    nodes: list[Node] = []
    for index, folder in [(0, out_dir), *sorted((int(p.name[4:]), p) for p in out_dir.glob("node[0-9]*"))]:
        try:
            m = CellMetrics.read(folder / "metrics.json")
        except ValueError as exc:
            m = CellMetrics(outcome="error", error=str(exc)[:2000])
        log = folder / "train.log"
        text = log.read_text(errors="replace") if log.exists() else "(no log came back)\n" if index == 0 else ""
        nodes.append((index, m.to_dict() if m else None, text, None))
    return nodes
