"""How a run ends on an error it understands: one ``megaclip: error: ...`` line, the exit code README
promises, and the line handed to torchrun as the failure's root cause.

Only the standard library here: it must work however far the start-up got.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import sys
import time
from typing import NoReturn

# Exit codes of a worker (README, "Reliability"); 0: finished, or stopped by a signal after saving.
BAD_INPUT = 2  # a config, checkpoint or data the run cannot use, an experiment directory in use, a failed save
NON_FINITE = 3  # too many non-finite steps in a row
COLLECTIVE_FAILED = 4  # a collective timed out or lost its peer: a rank stuck or dead

# How long a rank other than 0 waits before it reports (see exit_with_error): far longer than torchrun
# takes to notice rank 0's exit (it polls every 0.1 s), far shorter than anyone waits for a bad config.
PEER_GRACE_S = 3.0


def one_line(error: BaseException) -> str:
    """An error's own message on one line. An error raised in a data-loader worker reaches the main
    process re-raised as "Caught X in DataLoader worker process N. Original Traceback ...": its own
    message is the traceback's last line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].removeprefix(f"{type(error).__module__}.").removeprefix(f"{type(error).__name__}: ")
    return " ".join(text.split()) or type(error).__name__


def exit_with_error(message: str, code: int = BAD_INPUT, *, consequence: bool = False,
                    stop_received: bool = False) -> NoReturn:
    """Print ``megaclip: error: <message>`` to stderr and end this process with ``code``.

    torchrun kills the other workers as soon as one exits, so the rank that speaks first must be the
    one whose line counts. Most errors are met by every rank alike (a config, a checkpoint all of them
    read): rank 0 reports at once and the others wait a moment, so torchrun kills them silent and the
    line appears once. An error only one rank meets (its own checkpoint file, its own data) is still
    reported by that rank, after the wait, naming the rank. A ``consequence`` (a peer rank's death
    seen in a collective) waits on every rank: the rank that died has said why, or torchrun will. A
    rank that would wait but has ``stop_received`` already (torchrun ends the others with SIGTERM,
    which a preemption handler turns into a flag) exits at once, silent: another rank failed first.

    The process then ends at once: its atexit handlers run (a lock file is released), the rest of an
    interpreter's exit does not. That rest (destroying the process group, unloading torch) takes
    seconds, in which this rank, still alive to torchrun, has already dropped its peers, which then
    fail on their own and outlast their grace; destroying the group can also block on peers stuck in
    a collective this rank will never join.
    """
    rank = int(os.environ.get("RANK", "0"))
    line = f"megaclip: error: {message}" if rank == 0 else f"megaclip: error: rank {rank}: {message}"
    if rank != 0 or consequence:
        if stop_received:
            _exit_now(code)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a preemption handler would turn torchrun's kill into a flag
        time.sleep(PEER_GRACE_S)
    _record_for_launcher(line)  # only now: torchrun names the earliest record the root cause
    print(line, file=sys.stderr, flush=True)
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()  # CPython's own way to run them; nothing public does, short of a full exit
    os._exit(code)


def _record_for_launcher(line: str) -> None:
    """Write the line where torchrun looks for a worker's failure (the file its ``@record`` decorator
    would write, in the same JSON form), so its summary shows it as the root cause instead of "<N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}}, f)
    except OSError:
        pass  # the launcher's summary then lacks the line; stderr still has it
