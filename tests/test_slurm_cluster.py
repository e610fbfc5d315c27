"""The one-node Slurm cluster the tests start (tests/engines/slurm.py): what its jobs really do.

Tasks and GPUs (srun), a batch job's output and record, the ends a job can have (COMPLETED,
FAILED, CANCELLED, the quick TIMEOUT; tests/test_slurm.py has a cell that slurmctld kills at its
time limit) and a stop that leaves no process, job or port behind, with another cluster running.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.engines.slurm import SlurmCluster, missing, port_free, slurm_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.skipif(missing() is not None, reason=str(missing()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from slurm_cluster(tmp_path_factory)


def wait_for(path: Path, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not in {path} after {timeout:.0f} s: {path.read_text() if path.exists() else '-'}")


def test_starts_within_seconds(cluster):
    assert cluster.start_s < 10
    assert cluster.run("sinfo", "-h", "-N", "-o", "%N %T %c %G").stdout.split() == [
        cluster.node, "idle", str(cluster.cpus), "gpu:2"]
    assert cluster.ctld_port not in (6817, 6818) and cluster.slurmd_port not in (6817, 6818)


def test_srun_two_tasks(cluster):
    assert cluster.run("srun", "-n2", "hostname").stdout.splitlines() == [cluster.node, cluster.node]


@pytest.mark.slow
def test_srun_gpus(cluster):
    """Right after another job, srun may wait a scheduling pass (up to a second) for the cores."""
    env = dict(line.split("=", 1) for line in cluster.run("srun", "--gres=gpu:2", "env").stdout.splitlines()
               if "=" in line)
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["SLURM_GPUS_ON_NODE"] == "2"
    assert env["SLURM_JOB_NODELIST"] == cluster.node


@pytest.mark.slow
def test_batch_job_completes(cluster, tmp_path):
    out = tmp_path / "out.txt"
    job = cluster.sbatch("-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID")
    assert job.isdigit()
    record = cluster.wait(job)
    assert (record["JobState"], record["Reason"], record["ExitCode"]) == ("COMPLETED", "None", "0:0")
    assert (record["NodeList"], record["StdOut"]) == (cluster.node, str(out))
    assert out.read_text() == f"hello from {job}\n"
    # No accounting: sacct refuses; scontrol keeps the record (MinJobAge).
    sacct = cluster.run("sacct", "-j", job, check=False)
    assert (sacct.returncode, sacct.stderr.strip()) == (1, "Slurm accounting storage is disabled")
    assert cluster.run("squeue", "-h", "-j", job, "-o", "%i %T").stdout == ""
    assert cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T").stdout == f"{job} COMPLETED\n"


@pytest.mark.slow
def test_batch_job_fails_with_its_exit_code(cluster):
    record = cluster.wait(cluster.sbatch("-o", "/dev/null", "--wrap", "exit 3"))
    assert (record["JobState"], record["Reason"], record["ExitCode"]) == ("FAILED", "NonZeroExitCode", "3:0")


@pytest.mark.slow
def test_cancelled_job_gets_sigterm(cluster, tmp_path):
    """scancel: SIGTERM to the batch script and to its steps at once, SIGKILL after KillWait."""
    out = tmp_path / "out.txt"
    script = "\n".join([
        "#!/bin/bash",
        "trap 'echo batch got TERM; exit 0' TERM",
        "srun bash -c 'trap \"echo step got TERM; exit 0\" TERM; echo step started; while true; do sleep 0.1; done' &",
        "while true; do sleep 0.1; done",
    ])
    job = cluster.sbatch("-o", str(out), script=script)
    wait_for(out, "step started")
    cluster.run("scancel", job)
    record = cluster.wait(job, timeout=cluster.kill_wait_s + 20)
    assert (record["JobState"], record["Reason"]) == ("CANCELLED", "None")
    text = out.read_text()
    assert "batch got TERM" in text and "step got TERM" in text
    assert f"*** JOB {job} ON {cluster.node} CANCELLED AT" in text


@pytest.mark.slow
def test_quick_timeout(cluster, tmp_path):
    """Past its time limit (EndTime=now), a job that then exits 0 ends TIMEOUT at once (or, if
    slurmctld's time-limit check comes first, is killed and ends TIMEOUT all the same)."""
    out = tmp_path / "out.txt"
    t0 = time.monotonic()
    job = cluster.sbatch("-o", str(out), "--time=10", "--wrap", "echo started; sleep 1; echo done")
    cluster.wait(job, states=("RUNNING",))
    cluster.time_out(job)
    record = cluster.wait(job)
    assert (record["JobState"], record["Reason"], record["TimeLimit"]) == ("TIMEOUT", "TimeLimit", "00:01:00")
    assert record["ExitCode"] in ("0:0", "0:15")
    assert time.monotonic() - t0 < 10


@pytest.mark.slow
def test_two_nodes_pend_on_one(cluster):
    """Submitted (EnforcePartLimits is Slurm's default, NO), then pending for good: the reason is
    PartitionConfig at submission and PartitionNodeLimit from the first scheduling pass on."""
    job = cluster.sbatch("-o", "/dev/null", "--nodes=2", "--wrap", "true")
    try:
        reasons = [cluster.job(job)["Reason"]]
        deadline = time.monotonic() + 10
        while reasons[-1] != "PartitionNodeLimit" and time.monotonic() < deadline:
            time.sleep(0.1)
            record = cluster.job(job)
            if record["Reason"] != reasons[-1]:
                reasons.append(record["Reason"])
            assert record["JobState"] == "PENDING"
        assert reasons[-1] == "PartitionNodeLimit" and set(reasons) <= {"PartitionConfig", "PartitionNodeLimit"}
    finally:
        cluster.run("scancel", job)
    assert cluster.wait(job)["JobState"] == "CANCELLED"


def test_start_failure_says_why(tmp_path):
    """A daemon that exits while the cluster starts: an error with its log, and nothing left running."""
    broken = SlurmCluster(tmp_path / "slurm", extra_conf=("NoSuchOption=1",))
    with pytest.raises(RuntimeError, match=r"slurmctld exited 1 while the cluster started(.|\n)*"
                                           r"Parsing error at unrecognized key: NoSuchOption"):
        broken.start()
    assert broken.processes() == {} and _ours(broken) == {}


def _ours(cluster: SlurmCluster) -> dict[int, str]:
    """Processes with the cluster's folder in their command line or its slurm.conf in their environment,
    read here from /proc (not through the cluster's own scan)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{cluster.root}/" in cmdline or f"SLURM_CONF={cluster.conf}".encode() in environ:
            found[int(entry.name)] = cmdline
    return found


@pytest.mark.slow
def test_stop_leaves_nothing_behind(cluster, tmp_path):
    """A second cluster beside the first: its jobs, steps and daemons all gone after stop(), its
    ports free; the first cluster still works."""
    other = SlurmCluster(tmp_path / "slurm").start()
    try:
        assert {other.ctld_port, other.slurmd_port}.isdisjoint({cluster.ctld_port, cluster.slurmd_port})
        out = tmp_path / "out.txt"
        running = other.sbatch("-o", str(out), "--wrap", "srun bash -c 'echo step started; sleep 300'")
        pending = other.sbatch("-o", "/dev/null", "--begin=now+600", "--wrap", "true")
        wait_for(out, "step started")
        before = _ours(other).values()
        for name in ("munged", "slurmctld", "slurmd", "slurmstepd: [", "sleep 300"):
            assert any(name in cmd for cmd in before), (name, before)
        assert {running, pending} <= set(other.jobs())
    finally:
        other.stop()
    assert other.stop_s < 10
    assert _ours(other) == {}
    assert other.processes() == {}
    assert port_free(other.ctld_port) and port_free(other.slurmd_port)
    assert cluster.run("srun", "hostname").stdout.strip() == cluster.node
