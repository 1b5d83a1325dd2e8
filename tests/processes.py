"""The processes of a whole run under test: its ranks started without torchrun, and the processes read
from /proc (Linux), to signal its ranks or check that none outlives the run."""
import subprocess
import sys
from pathlib import Path

from tests.distributed import free_port


def start_ranks(nproc: int, args, env, stderr_files, **popen):
    """The ranks of a run started as torchrun would start them, minus torchrun, each writing its stderr
    to its file: for a test of what a rank does on its own (torchrun ends a job with a failed worker by
    waiting up to 30 s for the others to go before it kills them, a wait of its own that a rank which
    cannot act on SIGTERM always costs)."""
    port, ranks = free_port(), []
    for rank, path in zip(range(nproc), stderr_files):
        with open(path, "w") as stderr:
            ranks.append(subprocess.Popen([sys.executable, *args], stderr=stderr, **popen, env=env | {
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc)}))
    return ranks


def processes():
    """pid -> (parent pid, command line, environment) of this user's processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                environ = dict(v.split("=", 1) for v in (entry / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in v)
            except OSError:  # gone meanwhile, or not ours
                continue
            found[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline, environ)
    return found


def workers_of(launcher_pid: int):
    """rank -> pid of the workers a torchrun launcher started."""
    return {int(environ["RANK"]): pid for pid, (parent, _, environ) in processes().items()
            if parent == launcher_pid and "RANK" in environ}


def of_run(exp_dir):
    """The workers of a run and their data-loader workers (forked: the same command line)."""
    return [pid for pid, (_, cmdline, _) in processes().items() if f"exp_manager.exp_dir={exp_dir}" in cmdline
            and "torch.distributed.run" not in cmdline]
