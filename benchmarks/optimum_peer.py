"""Run benchmarks/optimum_worker.py in the Optimum virtualenv (`make peer-optimum`) and read its answer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer-optimum" / "bin" / "python"


def optimum(*args: str) -> dict:
    if not PEER_PYTHON.exists():
        raise SystemExit(f"{PEER_PYTHON} is missing: run `make peer-optimum` first (Optimum's exporter needs "
                         "transformers < 4.58, so it lives in its own virtualenv)")
    done = subprocess.run([str(PEER_PYTHON), str(ROOT / "benchmarks" / "optimum_worker.py"), *map(str, args)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"optimum_worker {' '.join(map(str, args))} failed ({done.returncode}):\n"
                         + "\n".join(done.stderr.splitlines()[-15:]))
    return json.loads(done.stdout.strip().splitlines()[-1])
