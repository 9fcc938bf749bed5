"""Runs train.py's run() TIMES times in this one process, as rank RANK of WORLD, and prints the exit code of each
as a JSON list on the last line of stdout, or the code and "group left" where a way out left the process group
behind (whose gloo threads, left to the interpreter's teardown, abort the process at exit now and then).

    python tests/exit_paths.py TIMES RANK WORLD PORT [train.py overrides ...]

Repetition k of a world of several uses port PORT + k, so that a rank that ends a repetition early cannot join the
previous one's store.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch.distributed as dist  # noqa: E402

import train  # noqa: E402  (train.py is a script at the root, not a module of the package)
from tests.helpers import composed  # noqa: E402


def main() -> None:
    times, rank, world, port = (int(arg) for arg in sys.argv[1:5])
    overrides = sys.argv[5:]
    codes = []
    for repetition in range(times):
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port + repetition),
        )
        code = 0
        try:
            train.run(composed(*overrides))
        except SystemExit as stop:
            code = stop.code
        codes.append(f"{code} group left" if dist.is_initialized() else code)
        sys.stderr.flush()
    print(json.dumps(codes), flush=True)


if __name__ == "__main__":
    main()
