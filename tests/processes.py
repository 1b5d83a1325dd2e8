"""The processes of a whole run under test, read from /proc (Linux), to signal its ranks or check that
none outlives the run."""
from pathlib import Path


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
