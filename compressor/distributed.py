"""Data-parallel calibration over torch.distributed (`compress run --nproc N`, or torchrun).

Every process loads the checkpoint and runs the recipe's stages up to the last one that splits its
calibration; the calibration batches are dealt out across the processes (batch i to process
i mod N). In each transformer block every process records its own batches' activation statistics
(Wanda's column norms, the Hessian X^T X of SparseGPT and GPTQ); these are summed over the
processes with all-reduce, so each process holds the statistics of all the batches; process 0
compresses the layers from them and broadcasts the new weights, and every process runs its own
batches through the compressed block to feed the next one. Process 0 alone then evaluates,
benchmarks and writes the run folder; the others stop after the last splitting stage.

The backend is gloo (CPU). Each process computes with cores / N threads, and the result equals, bit for
bit, one process's with that many threads (docs/BENCHMARKS.md); a different thread count changes float32
rounding, which SparseGPT's greedy column order amplifies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

# Calibrating a block of a large model on CPU can take minutes while the other processes wait in a
# collective; a dead peer is noticed at once (its sockets close), so a long timeout costs nothing.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def requested_rank() -> int:
    """This process's rank as the environment gives it (0 when none is given)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def requested_size() -> int:
    """The number of processes the environment asks for (torchrun and --nproc set WORLD_SIZE)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def start() -> None:
    """Join the process group the environment describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); a single
    process does nothing. Each process gets its share of the cores for torch's threads."""
    import torch
    import torch.distributed as dist

    size = requested_size()
    if size <= 1 or dist.is_initialized():
        return
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if active() else 0


def size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if active() else 1


def leads() -> bool:
    """Whether this process compresses, evaluates and writes (process 0, or the only one)."""
    return rank() == 0


def share(batches: Sequence[T]) -> list[T]:
    """This process's calibration batches: every N-th, starting at its rank."""
    return list(batches[rank()::size()])


def sum_statistics(statistics: Iterable) -> None:
    """Sum each LayerInputs' value and row count over the processes, in place (each object once:
    layers reading one tensor share one)."""
    import torch
    import torch.distributed as dist

    if not active():
        return
    unique = {id(s): s for s in statistics}.values()
    for stats in unique:
        if stats.value is not None:
            dist.all_reduce(stats.value)
        rows = torch.tensor([stats.rows], dtype=torch.int64)
        dist.all_reduce(rows)
        stats.rows = int(rows.item())
        peak = torch.tensor([stats.absmax], dtype=torch.float64)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        stats.absmax = float(peak.item())


def broadcast_weights(module) -> None:
    """Give every process process 0's parameters and buffers of `module`, bit for bit (as bytes, so
    that any dtype travels over gloo)."""
    import torch
    import torch.distributed as dist

    if not active():
        return
    for tensor in list(module.parameters()) + list(module.buffers()):
        data = tensor.data
        if not data.is_contiguous():
            raise RuntimeError("broadcast_weights: a non-contiguous tensor cannot be sent as bytes")
        dist.broadcast(data.view(-1).view(torch.uint8), src=0)


class Workers:
    """Processes 1..N-1 of `compress run --nproc N`, started by process 0 with the same command line.
    Their output goes to a log each, shown only when one fails; a failed worker ends the whole run at once
    (`on_failure`), since process 0 would otherwise wait in a collective for a peer that never comes."""

    def __init__(self, count: int, on_failure: Callable[[int, int, str], None]):
        self.count, self.on_failure = count, on_failure
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.stopping = False  # process 0 is ending the run: a worker's exit is no longer news

    def start(self) -> None:
        port = _free_port()
        common = {"WORLD_SIZE": str(self.count), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        os.environ.update({**common, "RANK": "0", "LOCAL_RANK": "0"})
        for worker in range(1, self.count):
            handle, name = tempfile.mkstemp(prefix=f"compress-process{worker}-", suffix=".log")
            self.logs.append(Path(name))
            env = {**os.environ, **common, "RANK": str(worker), "LOCAL_RANK": str(worker)}
            self.processes.append(subprocess.Popen([sys.executable, "-m", "compressor", *sys.argv[1:]], env=env,
                                                   stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
            os.close(handle)
        for worker, process in enumerate(self.processes, start=1):
            threading.Thread(target=self._watch, args=(worker, process), daemon=True).start()

    def _watch(self, worker: int, process: subprocess.Popen) -> None:
        code = process.wait()
        if code != 0 and not self.stopping:
            self.on_failure(worker, code, self._tail(worker))

    def _tail(self, worker: int, lines: int = 25) -> str:
        try:
            text = self.logs[worker - 1].read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def finish(self, succeeded: bool, wait_seconds: float = 60) -> None:
        """After a run that succeeded, wait for the workers (they end after the last splitting stage);
        after a failure stop them at once, since they may be waiting for process 0. Then remove the logs."""
        self.stopping = True
        for process in self.processes:
            if not succeeded:
                process.kill()
            try:
                process.wait(timeout=wait_seconds)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for log in self.logs:
            log.unlink(missing_ok=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
