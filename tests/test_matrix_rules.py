"""Matrix rules (exclude / include), remote compute settings, and what Metaflow ships remotely."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from steps.flow import compute
from steps.plan import catalog
from steps.plan.matrix import expand, parse_matrix
from steps.plan.schema import ConfigError
from tests.conftest import METAFLOW_ROOT, REPO

FLOW = str(REPO / "flows" / "finetune_matrix.py")
BASE = {"name": "rules", "models": "llama-debug", "peft": "lora", "strategy": ["single", "ddp"],
        "gpus": 2, "lr": [1e-3, 1e-2], "micro_batch": 4, "seq_len": 32}


def _axes(planned) -> list[tuple]:
    return [(p.cell.strategy, p.cell.lr, p.cell.micro_batch) for p in planned]


def test_exclude_drops_matching_cells_and_include_adds_or_changes_cells():
    spec = parse_matrix({
        **BASE,
        "exclude": [{"strategy": "ddp", "lr": 1e-2}],
        "include": [
            {"strategy": "ddp", "micro_batch": [8, 16]},  # new cells, for every lr
            {"strategy": "single", "lr": 1e-2, "train": {"lora": {"r": 16}}},  # changes one cell
        ],
    })
    planned = expand(spec)
    assert _axes(planned) == [
        ("single", 1e-3, 4), ("single", 1e-2, 4), ("ddp", 1e-3, 4),
        ("ddp", 1e-3, 8), ("ddp", 1e-3, 16), ("ddp", 1e-2, 8), ("ddp", 1e-2, 16),
    ]
    ranks = {(p.cell.strategy, p.cell.lr): p.cell.train.lora.r for p in planned if p.cell.micro_batch == 4}
    assert ranks == {("single", 1e-3): 8, ("single", 1e-2): 16, ("ddp", 1e-3): 8}
    assert planned[1].cell.train.lora.alpha == 16  # merged key by key, not replaced
    assert len({p.cell.cell_id for p in planned}) == 7


def test_rule_mistakes_are_reported_with_their_paths():
    with pytest.raises(ConfigError) as err:
        parse_matrix({**BASE, "exclude": [{"strategy": "dpp"}],
                      "include": [{"models": "no-such-model", "train": {"fault": {"kind": "explode"}, "bogus": 1}}]})
    text = str(err.value)
    assert "exclude[0].strategy[0]: 'dpp' is not allowed" in text
    assert "include[0].models[0]: 'no-such-model' is not a model preset" in text
    assert "include[0].train.fault.kind: 'explode' is not allowed; allowed values: 'raise', 'oom', 'hang', 'kill'" in text
    assert "include[0].train.bogus: unknown key" in text


def test_remote_compute_takes_one_instance_type_and_its_resources():
    with pytest.raises(ConfigError) as err:
        parse_matrix({**BASE, "instance": ["g5.12xlarge", "p3.8xlarge"], "compute": "kubernetes"})
    assert "one instance type per run" in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_matrix({**BASE, "instance": "g5.12xlarge", "compute": "batch"})
    assert "remote.queue: compute 'batch' needs the AWS Batch job queue" in str(err.value)
    assert "remote.image: compute 'batch' runs each cell in a container from this image; build it with " \
        "`make image`" in str(err.value)

    g5 = catalog.instances()["g5.12xlarge"]
    k8s = parse_matrix({**BASE, "instance": "g5.12xlarge", "compute": "kubernetes", "retries": 2,
                        "remote": {"image": "me/ft:1", "namespace": "ml"}}).model_dump()
    assert compute.train_decorators(k8s) == [
        ("retry", {"times": 2, "minutes_between_retries": 0}),
        ("kubernetes", {"gpu": 4, "cpu": g5.vcpus - 2, "memory": int(g5.memory_gb * 2**30 * 0.9 / 1e6),
                        "image": "me/ft:1", "node_selector": {"node.kubernetes.io/instance-type": "g5.12xlarge"},
                        "namespace": "ml"}),
    ]
    batch = parse_matrix({**BASE, "instance": "p3.8xlarge", "compute": "batch", "on_error": "record",
                          "remote": {"queue": "gpu-queue", "image": "me/ft:1", "shared_memory_mb": 8192}}).model_dump()
    decos = dict(compute.train_decorators(batch))
    assert decos["catch"] == {"var": "failure", "print_exception": True}
    assert decos["batch"] == {"gpu": 4, "cpu": 30, "memory": int(244 * 1024 * 0.9), "image": "me/ft:1",
                              "shared_memory": 8192, "queue": "gpu-queue"}


@pytest.mark.parametrize("image", [
    "ubuntu", "me/ft:1", "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime", "nvcr.io/nvidia/pytorch:24.01-py3",
    "123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-matrix:0.1.0", "localhost/finetune-matrix:0.1.0",
    "localhost:5000/team/ft@sha256:" + "a" * 64])
def test_a_well_formed_image_reference_is_taken(image):
    parse_matrix({**BASE, "instance": "g5.12xlarge", "compute": "kubernetes", "remote": {"image": image}})


@pytest.mark.parametrize("image", ["<registry>/finetune-matrix:<tag>", "Me/ft:1", "me//ft", "me/ft:", ":1",
                                   "me/ft:1 ", "https://me/ft:1", "me/ft@sha256:abc"])
def test_a_malformed_image_reference_is_refused_with_the_form_it_needs(image):
    with pytest.raises(ConfigError) as err:
        parse_matrix({**BASE, "instance": "g5.12xlarge", "compute": "kubernetes", "remote": {"image": image}})
    assert err.value.problems == [
        f"remote.image: {image!r} is invalid: not an image reference: [registry[:port]/]name[:tag][@digest], "
        "e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com/finetune-matrix:0.1.0"]


def test_more_processes_than_gpus_is_refused_with_a_bigger_instance_named():
    planned = expand(parse_matrix({**BASE, "strategy": "ddp", "instance": "g5.2xlarge", "gpus": 4,
                                   "precision": "bf16-mixed"}))
    assert "g5.2xlarge has 1 GPU(s), the cell asks for 4 per node; g5.12xlarge" in planned[0].refused


def _flow(*args, env=None):
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, FLOW, *args], capture_output=True, text=True,
                          env=env, cwd=METAFLOW_ROOT, timeout=180)


def test_code_package_ships_steps_and_configs():
    """Remote tasks get the flow's package: steps/ and configs/ must be in it."""
    proc = _flow("package", "list")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = (proc.stdout + proc.stderr).splitlines()
    for name in ("steps/train.py", "steps/trainer/engines/base.py", "steps/flow/launcher.py",
                 "configs/instances.yaml", "configs/models/llama-debug.yaml", "configs/matrix/default.yaml"):
        assert str(REPO / name) in listed, name


def test_the_matrix_puts_compute_decorators_on_the_train_step(tmp_path):
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump({**BASE, "instance": "g5.12xlarge", "compute": "kubernetes",
                                    "on_error": "record", "remote": {"image": "me/ft:1"}}))
    env = {"METAFLOW_DATASTORE_SYSROOT_S3": "s3://example-bucket/metaflow"}  # show needs no access
    remote = _flow("--datastore", "s3", "--config", "matrix", str(path), "show", env=env)
    assert remote.returncode == 0, remote.stderr[-2000:]
    train = (remote.stdout + remote.stderr).split("Step launch")[1].split("Step train")[0]
    assert {"@parallel", "@retry", "@kubernetes"} <= set(train.split())
    assert "@catch" not in train  # not allowed with @parallel on Kubernetes: the step records
    local = _flow("show")
    train = (local.stdout + local.stderr).split("Step launch")[1].split("Step train")[0]
    assert "@retry" in train and "@kubernetes" not in train and "@catch" not in train
    assert not compute.catches({"on_error": "record", "compute": "kubernetes"})
    assert compute.catches({"on_error": "record", "compute": "local"})


def test_instance_catalog_has_the_reference_families_with_consistent_facts():
    known = catalog.instances()
    for name in ("p3.2xlarge", "p3.8xlarge", "p3.16xlarge", "p3dn.24xlarge", "g5.xlarge",
                 "g5.12xlarge", "g5.48xlarge", "g6.xlarge", "g6.48xlarge", "p4d.24xlarge",
                 "p4de.24xlarge", "p5.48xlarge"):
        i = known[name]
        assert i.devices_per_node >= 1 and i.memory_per_device_gb and i.vcpus and i.memory_gb
        assert i.price_per_hour_usd > 0 and i.price_region == "us-east-1" and i.price_date
        assert i.sagemaker_instance == f"ml.{name}" and "http" in i.source
        assert (i.peak_tflops_bf16 is not None) == i.bf16  # no bf16 units, no bf16 peak
        assert i.peak_tflops_fp16 > i.peak_tflops_fp32 > 0
    assert not known["p3.8xlarge"].bf16 and known["p3.8xlarge"].devices_per_node == 4
    assert known["p4de.24xlarge"].memory_per_device_gb == 2 * known["p4d.24xlarge"].memory_per_device_gb
    # MFU uses the peak of the precision the matmuls run in.
    assert catalog.peak_tflops("p3.2xlarge", "fp16-mixed") == 125.0
    assert catalog.peak_tflops("p5.48xlarge", "bf16-mixed") == known["p5.48xlarge"].peak_tflops_bf16
    assert catalog.peak_tflops("p3.2xlarge", "fp32") == known["p3.2xlarge"].peak_tflops_fp32


def test_lora_on_a_tensor_parallel_head_is_refused_with_the_fix():
    lora = {"lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]}}
    planned = expand(parse_matrix({**BASE, "strategy": ["tensor", "pipeline"], "gpus": 2, "train": lora}))
    refused = {p.cell.strategy: p.refused for p in planned}
    assert refused["pipeline"] is None
    assert refused["tensor"].startswith("lora on lm_head with tensor parallelism") and "drop lm_head" in refused["tensor"]
    one = expand(parse_matrix({**BASE, "strategy": "tensor", "gpus": 1}))[0]
    assert one.refused == "tensor parallelism over 1 rank splits nothing; use gpus >= 2, or strategy single for one GPU"


def test_a_remote_run_on_a_local_datastore_is_refused_before_any_task(tmp_path):
    """Remote tasks cannot read this machine's datastore: the run stops at the flow's load, with
    the matrix's problem and the fix, and starts no task (Metaflow's own check would come later)."""
    path = tmp_path / "batch.yaml"
    path.write_text(yaml.safe_dump({**BASE, "instance": "g5.xlarge", "compute": "batch",
                                    "remote": {"queue": "gpu-queue", "image": "me/ft:1"}}))
    env = {"METAFLOW_DEFAULT_DATASTORE": "local", "USERNAME": "tester"}
    proc = _flow("--config", "matrix", str(path), "run", env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Workflow starting" not in out and "Task is starting" not in out
    assert "The matrix cannot run remotely:" in out
    assert ("compute: batch runs the cells' train steps on other machines, which cannot read Metaflow's 'local' "
            "datastore on this one; run with `--datastore s3`") in out
    assert compute.remote_problems({"compute": "batch", "nodes": [1]}, "s3") == []
    assert compute.remote_problems({"compute": "local", "nodes": [1]}, "local") == []
    (one_node,) = compute.remote_problems({"compute": "kubernetes", "nodes": [2], "include": [{"nodes": [1]}]}, "s3")
    assert one_node.startswith("nodes: 1 with compute: kubernetes: a cell's train step is a Metaflow @parallel step")
    assert compute.remote_problems({"compute": "kubernetes", "nodes": [2, 4]}, "s3") == []
    assert compute.datastore_of(["flow.py", "--datastore", "s3", "run"]) == "s3"
    assert compute.datastore_of(["flow.py", "--datastore=local", "run"]) == "local"
