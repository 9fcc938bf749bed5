"""Runs train.py's run() TIMES times in this one process, in a world of one, and prints the exit code of each as a
JSON list on the last line of stdout, or the code and "group left" where a way out left the process group behind
(whose gloo threads, left to the interpreter's teardown, abort the process at exit now and then).

    python tests/exit_paths.py TIMES [train.py overrides ...]
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
from nopetrain.parallel import free_port  # noqa: E402
from tests.helpers import composed  # noqa: E402


def main() -> None:
    times, overrides = int(sys.argv[1]), sys.argv[2:]
    codes = []
    for _ in range(times):
        # A port of its own each time: a group's store may outlive it for a moment.
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
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
