"""compute: slurm without a cluster: matrix rules, the batch script (a two-node cell on paper),
pricing at the cluster's own rate, and what each end of a job means for its cell."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from steps import REPO_ROOT
from steps.estimate import cost, matrix_plan
from steps.flow.slurm import outcome, script
from steps.plan.matrix import expand, parse_matrix
from steps.plan.schema import CellSpec, ConfigError
from steps.results.metrics import PARTIAL_CURVES, CellMetrics, LossPoint


def base_matrix(**extra):
    data = yaml.safe_load((REPO_ROOT / "configs/matrix/default.yaml").read_text())
    return {**data, "compute": "slurm", **extra}


def cell(**changes) -> CellSpec:
    spec = {"cell_id": "llama-debug-lora-ddp-2x8-abc", "matrix": "t", "model": "llama-debug", "peft": "lora",
            "strategy": "ddp", "instance": "p4d.24xlarge", "nodes": 2, "gpus": 8, "lr": 1e-3, "micro_batch": 4,
            "seq_len": 64, "train": {"max_steps": 4, "timeout_s": 600}}
    return CellSpec.model_validate({**spec, **changes})


def test_matrix_problems_for_slurm_are_reported_together():
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(remote={"queue": "q", "container": "pyxis", "gres": "gpu:{count}",
                                         "sbatch": ["exclusive"], "partition": "a b"}))
    problems = err.value.problems
    assert problems == [
        "remote.partition: 'a b' is invalid: string should match pattern '^[\\w.,-]+$'",
        "remote.gres: 'gpu:{count}' is invalid: the only placeholder is {gpus} (the cell's processes per node), "
        "not 'count'",
        "remote.sbatch: ['exclusive'] is invalid: not sbatch options: 'exclusive' (one option a line, e.g. "
        "'--constraint=a100' or '--exclusive')",
    ], problems
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(remote={"queue": "q", "container": "pyxis"}))
    assert err.value.problems == [
        "remote.queue: only used by compute 'batch', not 'slurm'",
        "remote.image: remote.container: pyxis needs the image it runs (e.g. the project's, `make image`)"]
    with pytest.raises(ConfigError) as err:
        parse_matrix(base_matrix(remote={"image": "registry.example.com/finetune-matrix:0.1"}))
    assert err.value.problems == [
        "remote.container: an image on Slurm needs the runtime that runs it on the nodes: pyxis (srun "
        "--container-image, enroot) or apptainer"]
    with pytest.raises(ConfigError) as err:  # Slurm keys are Slurm's
        parse_matrix({**base_matrix(compute="local"), "remote": {"partition": "gpu", "price_per_gpu_hour": 2.0}})
    assert err.value.problems == ["remote.partition: only used by compute 'slurm', not 'local'",
                                  "remote.price_per_gpu_hour: only used by compute 'slurm', not 'local'"]


TWO_NODES = """\
#!/bin/bash
#SBATCH --job-name=fm-llama-debug-lora-ddp-2x8-abc
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --gres=gpu:a100:8
#SBATCH --mem=1061683M
#SBATCH --time=11:40
#SBATCH --partition=gpu
#SBATCH --account=proj-42
#SBATCH --qos=high
#SBATCH --output=/shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc/slurm-%j.out
#SBATCH --no-requeue
#SBATCH --exclusive
#SBATCH --constraint=a100
# finetune-matrix cell llama-debug-lora-ddp-2x8-abc: 2 node(s) x 8 process(es)
set -eo pipefail
# The flow wrote the cell's folder on the machine that submitted this job: the nodes must share it.
if [ ! -f /shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc/cell.yaml ]; then
  echo "finetune-matrix: /shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc/cell.yaml is not on this node \
($(hostname)): the run's folder must be on a filesystem the submitting machine and the nodes share \
(FINETUNE_MATRIX_REPORTS)" >&2
  exit 97
fi
module load cuda/12.4
source /shared/venv/bin/activate
export NCCL_SOCKET_IFNAME=ib0
cd {root}
# torchrun's rendezvous on the first node of the allocation
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
srun --nodes=$SLURM_JOB_NUM_NODES --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=96 python -m \
steps.flow.slurm.entry --cell /shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc/cell.yaml --out \
/shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc
"""


def test_a_two_node_cell_s_job_script_on_paper():
    """Two nodes of a p4d.24xlarge-like node (8 GPUs, 96 vCPUs, 1152 GB): one task a node, each
    the node entry (torchrun on its 8 GPUs), meeting at the first node of the allocation."""
    remote = {"partition": "gpu", "account": "proj-42", "qos": "high", "gres": "gpu:a100:{gpus}",
              "sbatch": ["--exclusive", "--constraint=a100"], "startup_allowance_s": 100,
              "setup": ["module load cuda/12.4", "source /shared/venv/bin/activate", "export NCCL_SOCKET_IFNAME=ib0"]}
    text = script.job_script(cell(), remote, Path("/shared/reports/7/cells/llama-debug-lora-ddp-2x8-abc"))
    assert text == TWO_NODES.replace("\\\n", "").replace("{root}", str(REPO_ROOT))


def test_one_cpu_node_asks_for_its_cores_and_the_flow_s_python():
    """CPU processes stand in for GPUs: a core each, no gres unless asked for (`gres:
    "gpu:{gpus}"` reserves the node's GPUs by count); no memory where the catalog knows none."""
    c = cell(instance="local-cpu", nodes=1, gpus=2)
    assert script.options(c, {}, Path("/o"))[:5] == [
        "--job-name=fm-llama-debug-lora-ddp-2x8-abc", "--nodes=1", "--ntasks-per-node=1", "--cpus-per-task=2",
        "--time=40:00"]
    assert "--gres=gpu:2" in script.options(c, {"gres": "gpu:{gpus}"}, Path("/o"))
    assert not any(o.startswith(("--gres", "--mem")) for o in script.options(c, {}, Path("/o")))
    last = script.job_script(c, {"time_limit_s": 75}, Path("/o")).splitlines()
    assert "#SBATCH --time=1:15" in last
    assert last[-1].startswith(f"srun --nodes=$SLURM_JOB_NUM_NODES --ntasks-per-node=1 --kill-on-bad-exit=1 "
                               f"--cpus-per-task=2 {sys.executable} -m steps.flow.slurm.entry")
    assert f"cd {REPO_ROOT}" in last


@pytest.mark.parametrize("runtime, expected", [
    ("pyxis", "--container-image=reg.example.com/fm:1 --container-mounts=/shared/r/7:/shared/r/7 "
              "--container-workdir=/opt/finetune-matrix python -m steps.flow.slurm.entry"),
    ("apptainer", "apptainer exec --nv --bind /shared/r/7 --pwd /opt/finetune-matrix reg.example.com/fm:1 "
                  "python -m steps.flow.slurm.entry"),
])
def test_an_image_runs_under_the_cluster_s_container_runtime(runtime, expected):
    text = script.job_script(cell(), {"image": "reg.example.com/fm:1", "container": runtime},
                             Path("/shared/r/7/cells/c"))
    assert expected in text.splitlines()[-1]
    assert "\ncd " not in text  # the image holds the code


def test_the_plan_prices_slurm_cells_at_the_cluster_s_rate_or_says_it_is_unknown():
    c = cell()
    assert cost.hourly_usd(c, cost.Pricing("slurm", 2.5)) == 2.5 * 16
    assert cost.hourly_usd(c, "slurm") is None  # the catalog's cloud price does not apply
    assert cost.hourly_usd(c, "local") == pytest.approx(2 * 21.957642)  # the catalog's p4d, per node
    priced = parse_matrix(base_matrix(remote={"price_per_gpu_hour": 2.0}, train={"max_steps": 10}))
    assert cost.Pricing.of(priced) == cost.Pricing("slurm", 2.0)
    plan = matrix_plan.plan_matrix(expand(priced), {}, cost.Pricing.of(priced))
    for cell_id, p in plan.plans.items():
        world = next(x.cell.world_size for x in expand(priced) if x.cell.cell_id == cell_id)
        assert p.cost_usd == pytest.approx(p.wall_s / 3600 * 2.0 * world)
    unpriced = parse_matrix(base_matrix(train={"max_steps": 10}))
    plan = matrix_plan.plan_matrix(expand(unpriced), {}, cost.Pricing.of(unpriced))
    assert plan.cost_usd is None and all(p.cost_usd is None for p in plan.plans.values())


def _record(state: str, code: str = "0:0", **extra) -> dict[str, str]:
    line = (f"JobId=41 JobName=fm-c UserId=root(0) JobState={state} Reason=None ExitCode={code} "
            f"SubmitTime=2026-12-06T10:00:00 StartTime=2026-12-06T10:00:05 EndTime=2026-12-06T10:01:05 "
            f"NodeList=gpu[01-02] TimeLimit=00:01:40 " + " ".join(f"{k}={v}" for k, v in extra.items()))
    return outcome.parse_record(line)


def _folder(tmp_path, outcome_="ok", steps=3, partial=0):
    c = cell()
    tmp_path.mkdir()
    if outcome_ is not None:
        CellMetrics(cell_id=c.cell_id, outcome=outcome_, wall_s=50.0, val_loss=1.5,
                    loss_curve=[LossPoint(step=i + 1, loss=2.0 - 0.1 * i, tokens=256 * (i + 1), time_s=0.5 * (i + 1)) for i in range(steps)]
                    ).write(tmp_path / "metrics.json")
    (tmp_path / "train.log").write_text("[rank0]: step 1\n")
    if partial:
        (tmp_path / PARTIAL_CURVES).write_text("".join(
            f'{{"curve": "loss_curve", "step": {i + 1}, "loss": {2.0 - 0.1 * i}, "tokens": {256 * (i + 1)}, '
            f'"time_s": {0.5 * (i + 1)}}}\n' for i in range(partial)))
    return c


def test_each_end_of_a_job_is_the_outcome_a_local_cell_would_have(tmp_path):
    c = _folder(tmp_path / "ok")
    m, log = outcome.job_result(c, _record("COMPLETED"), tmp_path / "ok")
    assert (m.outcome, m.job_id, m.job_status, m.job_nodes, m.queued_s, m.wall_s) == (
        "ok", "41", "COMPLETED", "gpu[01-02]", 5.0, 50.0)
    assert log == "[rank0]: step 1\n"

    # Slurm's time limit: the curve so far, from the file the trainer appends to
    c = _folder(tmp_path / "timeout", outcome_=None, partial=4)
    m, _ = outcome.job_result(c, _record("TIMEOUT", "0:15"), tmp_path / "timeout", limit="1:40")
    assert (m.outcome, m.stopped_after_steps, m.wall_s) == ("timeout", 4, 60.0)
    assert m.error == "Slurm job 41 stopped at its time limit (TIMEOUT, --time=1:40; 4 steps done)"

    c = _folder(tmp_path / "oom", outcome_=None, partial=2)
    m, _ = outcome.job_result(c, _record("OUT_OF_MEMORY", "0:125"), tmp_path / "oom")
    assert m.outcome == "oom" and m.error.startswith("Slurm job 41: the node killed it for memory (OUT_OF_MEMORY")

    for state in ("NODE_FAIL", "PREEMPTED"):  # not the cell's fault: retried by the flow
        c = _folder(tmp_path / state, outcome_="error", steps=2)
        m, _ = outcome.job_result(c, _record(state, "0:9"), tmp_path / state)
        assert m.outcome == "error" and m.error.startswith(f"Slurm job 41 ended {state} (None): the cell is retried")

    c = _folder(tmp_path / "cancelled", outcome_=None, partial=3)
    m, _ = outcome.job_result(c, _record("CANCELLED", "0:15"), tmp_path / "cancelled")
    assert (m.outcome, m.error) == ("stopped", "Slurm job 41 was cancelled on the cluster (scancel) after 3 steps")

    # the trainer's own word stands: an oom it caught is an oom, whatever Slurm says of the script
    c = _folder(tmp_path / "own", outcome_="oom", steps=1)
    m, _ = outcome.job_result(c, _record("FAILED", "3:0"), tmp_path / "own")
    assert m.outcome == "oom"
    for state in ("CANCELLED", "TIMEOUT"):  # ... and a cell that had ended stays ended, oom or ok
        for own in ("oom", "ok"):
            c = _folder(tmp_path / f"{own}-then-{state}", outcome_=own, steps=2)
            m, _ = outcome.job_result(c, _record(state, "0:15"), tmp_path / f"{own}-then-{state}")
            assert (m.outcome, m.job_status) == (own, state), (own, state, m.error)

    (tmp_path / "unshared").mkdir()
    m, log = outcome.job_result(cell(), _record("FAILED", "97:0"), tmp_path / "unshared")
    assert m.outcome == "error" and m.error.startswith("Slurm job 41 could not see the cell's folder")
    assert log == "(no log came back)\n"
    assert outcome.state_of({"JobState": "CANCELLED by 0"}) == "CANCELLED"  # as sacct says it


def test_a_machine_without_slurm_s_commands_is_told_to_run_the_flow_on_a_login_node(monkeypatch, tmp_path):
    from steps.flow.slurm.submit import missing_client

    monkeypatch.setenv("PATH", str(tmp_path))
    assert missing_client() == (
        "compute: slurm submits each cell with Slurm's client commands, and sbatch, scontrol, scancel are not on "
        "this machine's PATH: run the flow on a login node of the cluster")
    (tmp_path / "sbatch").write_text("#!/bin/sh\n")
    (tmp_path / "sbatch").chmod(0o755)
    (tmp_path / "scancel").write_text("#!/bin/sh\n")
    (tmp_path / "scancel").chmod(0o755)
    assert missing_client().split(", and ")[1].startswith("scontrol is not on")
