"""One cell's result from its nodes: a cell over N nodes (Metaflow's @parallel tasks, or a
SageMaker job's instances) measures on node 0, and any failed node fails it."""

from __future__ import annotations

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
