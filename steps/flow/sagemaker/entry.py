"""What a cell's SageMaker training job runs in its container (one per instance).

    $SM_PYTHON_CMD -m steps.flow.sagemaker.entry --cell cell.yaml

The same launcher as a local cell (`steps.flow.launcher.run_cell`: torchrun or DeepSpeed's
launcher, one process per GPU, the same time limit and hang watch), with the rendezvous taken
from the SageMaker environment (hosts, this host's rank, master address and port, network
interface). The cell folder then goes to S3 whatever happened, so metrics.json comes back even
when the job fails; a failed cell leaves its outcome in /opt/ml/output/failure, which SageMaker
reports as the job's FailureReason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from steps.flow import launcher
from steps.flow.sagemaker.job import DATA_CHANNEL, MODEL_CHANNEL, split_s3
from steps.plan.schema import CellSpec

FAILURE_MAX = 1024  # SageMaker keeps the first 1 KiB of the failure file


@dataclass(frozen=True)
class Host:
    """This instance's place in the job, as SageMaker's environment describes it."""

    hosts: list[str]
    current: str
    master_addr: str
    master_port: int
    interface: str

    @property
    def rank(self) -> int:
        return sorted(self.hosts).index(self.current)

    @classmethod
    def from_env(cls, env=os.environ) -> Host:
        hosts = json.loads(env.get("SM_HOSTS", '["algo-1"]'))
        return cls(hosts=hosts, current=env.get("SM_CURRENT_HOST", hosts[0]),
                   master_addr=env.get("SM_MASTER_ADDR", sorted(hosts)[0]),
                   master_port=int(env.get("SM_MASTER_PORT", 7777)),
                   interface=env.get("SM_NETWORK_INTERFACE_NAME", "eth0"))


def at_channels(cell: CellSpec, env=os.environ) -> CellSpec:
    """Point the cell at the channels its local data file and model folder were uploaded to."""
    data, model = env.get(f"SM_CHANNEL_{DATA_CHANNEL.upper()}"), env.get(f"SM_CHANNEL_{MODEL_CHANNEL.upper()}")
    changes = {}
    if data and cell.data.path:
        changes["data"] = cell.data.model_copy(update={"path": str(Path(data) / Path(cell.data.path).name)})
    if model:
        changes["model"] = str(Path(model) / Path(cell.model).name)
    return cell.model_copy(update=changes) if changes else cell


def upload(folder: Path, uri: str) -> int:
    """Every file of the cell folder to s3://... (checkpoints have their own channel)."""
    import boto3

    bucket, prefix = split_s3(uri)
    s3, count = boto3.client("s3"), 0
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not path.is_symlink() and rel.parts[0] != "checkpoints":
            s3.upload_file(str(path), bucket, f"{prefix}/{rel.as_posix()}")
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", required=True)
    args = parser.parse_args(argv)
    cell = at_channels(CellSpec.model_validate(yaml.safe_load(Path(args.cell).read_text())))
    host = Host.from_env()
    out = Path(os.environ.get("SM_OUTPUT_DATA_DIR", "/opt/ml/output/data")) / "cell"
    out.mkdir(parents=True, exist_ok=True)
    # The trainer checkpoints into out/checkpoints: make that SageMaker's checkpoint folder,
    # which it syncs to S3 and restores after a spot interruption.
    checkpoints = Path(os.environ.get("FINETUNE_MATRIX_CHECKPOINT_DIR", "/opt/ml/checkpoints"))
    checkpoints.mkdir(parents=True, exist_ok=True)
    if not (out / "checkpoints").exists():
        (out / "checkpoints").symlink_to(checkpoints, target_is_directory=True)
    if len(host.hosts) > 1:  # collectives between instances go over the job's network
        os.environ.setdefault("NCCL_SOCKET_IFNAME", host.interface)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", host.interface)
        master, port = host.master_addr, host.master_port
    else:  # one instance: its processes meet on loopback
        master, port = "127.0.0.1", launcher.free_port()
    print(f"finetune-matrix: cell {cell.cell_id} on {host.current} (node {host.rank} of "
          f"{len(host.hosts)}), {cell.gpus} process(es) per node, master {master}:{port}",
          flush=True)
    m = launcher.run_cell(cell, out, node_rank=host.rank, master_addr=master, port=port,
                          resume=cell.train.checkpoint_every > 0)
    results = os.environ.get("FINETUNE_MATRIX_RESULTS_S3")
    if results:
        target = results if host.rank == 0 else f"{results.rstrip('/')}/node{host.rank}"
        print(f"finetune-matrix: {upload(out, target)} file(s) -> {target}", flush=True)
    print(f"finetune-matrix: outcome {m.outcome}" + (f": {m.error}" if m.error else ""), flush=True)
    if m.outcome == "ok":
        return 0
    failure = Path(os.environ.get("SM_OUTPUT_FAILURE", "/opt/ml/output/failure"))
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.write_text(f"{m.outcome}: {m.error or ''}"[:FAILURE_MAX])
    return m.exit_code if isinstance(m.exit_code, int) and m.exit_code > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
