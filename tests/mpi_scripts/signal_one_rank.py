"""Under mpiexec: `metasolve train ARGS...`, and the last rank sends SIGTERM to itself alone once the
root's metrics file holds 3 steps. Every rank must stop after the same step, checkpointed (the stop
request travels in the executor's all-gather). Usage: signal_one_rank.py METRICS_FILE ARGS..."""
import os
import signal
import sys
import threading
import time
from pathlib import Path

from metasolve.app.cli import main
from solvers._petsc import MPI


def signal_after_three_steps(metrics: Path) -> None:
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGTERM)


if MPI.COMM_WORLD.Get_rank() == MPI.COMM_WORLD.Get_size() - 1:
    threading.Thread(target=signal_after_three_steps, args=(Path(sys.argv[1]),), daemon=True).start()
sys.exit(main(sys.argv[2:]))
