"""A real one-node Slurm cluster for the tests: its own munged, slurmctld and slurmd, all in a folder.

Debian's slurm-wlm and munge (`make engines` installs them); nothing of the machine's own is used
or changed: munged gets its own key and socket (`AuthInfo=socket=...` points Slurm at it), and
slurmctld and slurmd listen on free loopback ports (never 6817/6818), so two clusters, or a
system Slurm, never clash. The node is this machine (its short host name at 127.0.0.1) with
every core and 2 GPUs whose device files are made with mknod (gres.conf); there is no accounting,
so `sacct` answers "Slurm accounting storage is disabled" and `scontrol show job -o ID` is the
record of a job (kept for MinJobAge, an hour, after it ends).

    with SlurmCluster(tmp / "slurm") as cluster:
        job = cluster.sbatch("--wrap", "echo hi", "-o", str(tmp / "out.txt"))
        assert cluster.wait(job)["JobState"] == "COMPLETED"
        subprocess.run(["srun", "-n2", "hostname"], env=cluster.env)

Time limits: Slurm's resolution is a minute and slurmctld checks them every 30 s (PERIODIC_TIMEOUT,
counted from its start), so `--time=1` times out 60 to 90 s after the job starts. `time_out(job)`
(`scontrol update JobId=ID EndTime=now`, sent again if it reaches slurmctld in the second after
the one the client read as "now", which slurmctld refuses as a time past) puts a running job
past its time limit now: a job that then exits 0 by itself ends TIMEOUT at once; one still
running is killed at slurmctld's next check (SIGTERM to every step, SIGKILL after KillWait, 5 s)
and ends TIMEOUT; `next_limit_check()` says when that check comes.

Everything is stopped by process id on `stop()`: jobs cancelled, then slurmd, slurmctld and munged
(SIGTERM, then SIGKILL), then any slurmstepd or job process of this cluster (found in /proc by
SLURM_CONF in its environment, the folder in its command line, or its parent) is killed, and
none may be left.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
# The states a job does not leave (scontrol's JobState).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE")
# slurmctld tests running jobs against their time limits this often (slurmctld.h), from its start.
LIMIT_CHECK_S = 30
# Environment variables that would tie a client command to another cluster or job (set when the
# tests themselves run inside a Slurm job): dropped from `env`.
FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCONTROL_", "SCANCEL_")
# Unix socket paths are at most 107 bytes.
MAX_SOCKET_PATH = 100


def missing() -> str | None:
    """Why a Slurm cluster cannot be started here (None: it can)."""
    for tool in (*DAEMONS, *CLIENTS):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install slurm-wlm slurm-client munge; make engines)"
    if os.geteuid() != 0:
        return "a Slurm cluster's slurmd runs jobs as root and makes device files: the tests must run as root"
    return None


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on every address now (held together while chosen)."""
    held = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            held.append(s)
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def port_free(port: int) -> bool:
    """Nothing listens on `port` (connections left in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def machine_memory_mib(margin_mib: int = 1024) -> int:
    """This machine's memory in MiB (/proc/meminfo's MemTotal) less `margin_mib`: what the node
    declares (slurmd refuses a node that declares more than it has)."""
    kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return max(256, kib // 1024 - margin_mib)


def parse_record(text: str) -> dict[str, str]:
    """One line of `scontrol show ... -o` as {key: value}. Values may hold spaces and '=' (TRES=cpu=1,node=1);
    a key is a word after a space, followed by '='."""
    text = text.strip()
    keys = list(re.finditer(r"(?:^| )([A-Za-z][\w:/]*)=", text))
    return {m.group(1): text[m.end():keys[i + 1].start() if i + 1 < len(keys) else len(text)].strip()
            for i, m in enumerate(keys)}


def _read(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return ""


class SlurmCluster:
    """One node (`node`, default this machine's short host name) at 127.0.0.1, its files in `root`.

    `cpus` (default every core) and `memory_mib` are what the node declares (SlurmdParameters=
    config_overrides: more cores than the machine has are taken as declared); `gpus` device
    files (0: no GRES); `extra_conf`, more lines for slurm.conf (e.g. "EnforcePartLimits=ALL": a
    job asking more than the partition has is refused at submission instead of pending forever). `env` is the environment for Slurm's client commands and for flows that
    submit to this cluster.
    """

    def __init__(self, root: Path, node: str | None = None, cpus: int | None = None, gpus: int = 2,
                 memory_mib: int | None = None, kill_wait_s: int = 5, min_job_age_s: int = 3600,
                 extra_conf: tuple[str, ...] = ()):
        self.root = Path(root).resolve()
        self.node = node or socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.gpus = gpus
        self.memory_mib = memory_mib or machine_memory_mib()
        self.kill_wait_s = kill_wait_s
        self.min_job_age_s = min_job_age_s
        self.extra_conf = tuple(extra_conf)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.logs = self.root / "log"
        self.ctld_port = self.slurmd_port = 0
        self.procs: dict[str, subprocess.Popen] = {}
        self.started_at = 0.0  # time.time() when slurmctld started (its time-limit checks count from it)
        self.start_s = self.stop_s = 0.0

    # ---- lifetime
    def start(self, timeout: float = 30) -> SlurmCluster:
        why = missing()
        if why:
            raise RuntimeError(why)
        t0 = time.monotonic()
        try:
            self._write_files()
            self._start_munged(deadline=time.monotonic() + timeout)
            self._start_slurm(deadline=time.monotonic() + timeout)
        except BaseException:
            self.stop(check=False)
            raise
        self.start_s = time.monotonic() - t0
        return self

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def env(self) -> dict[str, str]:
        """This process's environment without another cluster's or job's Slurm variables, with
        SLURM_CONF at this cluster (the client commands find munged's socket in it)."""
        return client_env(self)

    def _write_files(self) -> None:
        for sub in ("munge", "munge/key", "state", "spool", "log", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        if len(str(self.munge_socket)) > MAX_SOCKET_PATH:
            raise RuntimeError(f"the folder's path is too long for munged's socket: {self.munge_socket}")
        # munged wants its key owned by its user (root here), readable by no one else, in a folder
        # no one else may write; the socket's folder open to all (clients of any user connect).
        os.chmod(self.root / "munge", 0o755)
        os.chmod(self.root / "munge" / "key", 0o700)
        key = self.root / "munge" / "key" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        devices = []
        for i in range(self.gpus):
            dev = self.root / "dev" / f"nvidia{i}"
            if not dev.exists():
                # /dev/null's numbers: slurmd counts the files; CUDA_VISIBLE_DEVICES comes from it.
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
            devices.append(dev)
        self.ctld_port, self.slurmd_port = free_ports(2)
        self.conf.write_text(self.slurm_conf())
        (self.root / "gres.conf").write_text(
            "".join(f"NodeName={self.node} Name=gpu File={dev}\n" for dev in devices))

    def slurm_conf(self) -> str:
        r = self.root
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        return "\n".join([
            "# A one-node cluster for the tests (tests/engines/slurm.py).",
            "ClusterName=fmtest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={r}/spool",
            f"SlurmctldPidFile={r}/slurmctld.pid",
            f"SlurmdPidFile={r}/slurmd.pid",
            f"SlurmctldLogFile={self.logs}/slurmctld.log",
            f"SlurmdLogFile={self.logs}/slurmd.log",
            # debug2 logs each time-limit check ("Testing job time limits"): next_limit_check() reads it.
            "SlurmctldDebug=debug2",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SwitchType=switch/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            # A submitted batch job is scheduled within a second (the default delay is 3 s).
            "SchedulerParameters=batch_sched_delay=0",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "GresTypes=gpu",
            # A job's record stays for `scontrol show job` after it ends.
            f"MinJobAge={self.min_job_age_s}",
            # SIGTERM to SIGKILL when a job is cancelled or timed out; no grace past a time limit.
            f"KillWait={self.kill_wait_s}",
            "OverTimeLimit=0",
            "InactiveLimit=0",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mib}{gres} "
            "State=UNKNOWN",
            f"PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
            *self.extra_conf,
            "",
        ])

    def _popen(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.logs / f"{name}.out", "ab") as out:
            proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        self.procs[name] = proc
        return proc

    def _start_munged(self, deadline: float) -> None:
        m = self.root / "munge"
        # --force: munged runs as root here (the munge user could not reach a test's folder).
        proc = self._popen("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={m}/key/munge.key",
            f"--pid-file={m}/munged.pid", f"--log-file={self.logs}/munged.log", f"--seed-file={m}/munged.seed"])
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"munged exited {proc.returncode}: {self.log_tails()}")
            if self.munge_socket.exists():
                return
            time.sleep(0.02)
        raise RuntimeError(f"munged made no socket in time: {self.log_tails()}")

    def _start_slurm(self, deadline: float) -> None:
        self.started_at = time.time()
        self._popen("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._popen("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.node])
        state = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited {proc.returncode} while the cluster started: {self.log_tails()}")
            out = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            state = out.stdout.strip()
            if out.returncode == 0 and state == "idle":
                return
            time.sleep(0.1)
        raise RuntimeError(f"node {self.node} not idle in time (sinfo: {state!r}): {self.log_tails()}")

    def log_tails(self, limit: int = 2000) -> str:
        """The end of every daemon's log, for error messages."""
        parts = []
        for path in sorted(self.logs.glob("*")) if self.logs.is_dir() else []:
            text = _read(path, limit).strip()
            if text:
                parts.append(f"--- {path.name}\n{text}")
        return "\n".join(parts) or "(no logs)"

    # ---- the client commands
    def run(self, *args: str, check: bool = True, timeout: float = 60, input: str | None = None,
            **kwargs: Any) -> subprocess.CompletedProcess:
        """A Slurm client command (`sbatch ...`, `srun ...`) against this cluster; output as text.
        `check`: a non-zero exit raises, with the command's own message."""
        proc = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=input, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:4])} ... exited {proc.returncode}: "
                               f"{proc.stderr.strip()[-3000:] or proc.stdout.strip()[-3000:]}")
        return proc

    def sbatch(self, *args: str, script: str | None = None, **kwargs: Any) -> str:
        """Submit a batch job (`sbatch --parsable ARGS`, the script on stdin if given); its id."""
        return self.run("sbatch", "--parsable", *args, input=script, **kwargs).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """The job's record (`scontrol show job -o ID`)."""
        return parse_record(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def jobs(self) -> list[str]:
        """Ids of the jobs still queued, running or completing."""
        return self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()

    def wait(self, job_id: str, timeout: float = 60, states: tuple[str, ...] = ENDED) -> dict[str, str]:
        """The job's record once its state is one of `states` (default: it has ended)."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record.get("JobState") in states:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {record.get('JobState')} after {timeout:.0f} s: {record}")
            time.sleep(0.1)

    def time_out(self, job_id: str) -> None:
        """Put a running job past its time limit now (`scontrol update JobId=ID EndTime=now`; the
        job should have a --time). Exiting 0 by itself, it ends TIMEOUT at once; still running at
        slurmctld's next time-limit check, it is killed then and ends TIMEOUT."""
        for _ in range(5):  # "now" is the client's second; a request that lands in the next one is refused
            proc = self.run("scontrol", "update", f"JobId={job_id}", "EndTime=now", check=False)
            if proc.returncode == 0 or "Invalid time specified" not in proc.stderr:
                break
        if proc.returncode != 0:
            raise RuntimeError(f"scontrol update JobId={job_id} EndTime=now exited {proc.returncode}: {proc.stderr.strip()}")

    def next_limit_check(self) -> float:
        """Seconds until slurmctld next tests running jobs against their time limits (from the last
        check in its log, else from its start; each comes at most about a second late)."""
        last = self.started_at
        for line in _read(self.logs / "slurmctld.log", 200_000).splitlines():
            if "Testing job time limits" in line:
                with contextlib.suppress(ValueError):
                    last = datetime.strptime(line[1:24], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
        return max(0.0, last + LIMIT_CHECK_S - time.time())

    # ---- stopping
    def processes(self) -> dict[int, str]:
        """{pid: command line} of every process of this cluster still alive: its daemons, slurmstepd,
        job steps and client commands (SLURM_CONF at this cluster in their environment, or the
        folder in their command line), and their descendants. Never this process or its parents."""
        mine = {os.getpid()}
        with contextlib.suppress(OSError):
            pid = os.getppid()
            while pid > 1:
                mine.add(pid)
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        marker = f"SLURM_CONF={self.conf}".encode()
        inside = f"{self.root}/".encode()  # a path in the folder (slurm1/ is not slurm10/)
        found: dict[int, str] = {}
        parents: dict[int, int] = {}
        commands: dict[int, str] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in mine:
                continue
            pid = int(entry.name)
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                environ = (entry / "environ").read_bytes()
            except (OSError, ValueError):
                continue  # gone meanwhile
            if state == "Z":
                continue  # exited, not yet reaped by its parent
            parents[pid] = int(parent)
            commands[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
            if inside in cmdline or marker in environ.split(b"\0"):
                found[pid] = commands[pid]
        grown = True
        while grown:
            grown = False
            for pid, parent in parents.items():
                if parent in found and pid not in found and pid not in mine:
                    found[pid] = commands.get(pid, "")
                    grown = True
        return found

    def stop(self, check: bool = True, grace: float = 10) -> None:
        """Cancel every job, stop the daemons (SIGTERM, SIGKILL after `grace` s), kill what is left
        of the cluster's processes. `check`: raise if a job or a process is still there."""
        t0 = time.monotonic()
        left_jobs: list[str] = []
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            jobs = self.jobs()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + self.kill_wait_s + 10
                while (left_jobs := self.jobs()) and time.monotonic() < deadline:
                    time.sleep(0.1)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        left: dict[int, str] = {}
        for _ in range(50):
            left = self.processes()
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        self.procs.clear()
        self.stop_s = time.monotonic() - t0
        if check and (left_jobs or left):
            raise RuntimeError(f"the Slurm cluster in {self.root} left jobs {left_jobs} and processes {left}")


def slurm_cluster(tmp_path_factory: Any, **kwargs: Any) -> Iterator[SlurmCluster]:
    """A started cluster in a new temporary folder, stopped after use; skips the test where
    Slurm or munge is not installed. In a test module:

        @pytest.fixture(scope="module")
        def cluster(tmp_path_factory):
            yield from slurm_cluster(tmp_path_factory)
    """
    import pytest

    why = missing()
    if why:
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), **kwargs) as cluster:
        yield cluster


def client_env(cluster: SlurmCluster, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) for a command that talks to `cluster`."""
    base = os.environ if base is None else base
    return {**{k: v for k, v in base.items() if not k.startswith(FOREIGN_PREFIXES)},
            "SLURM_CONF": str(cluster.conf), **extra}
