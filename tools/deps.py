"""The locked environment: write the lock, and test the newest versions against it on purpose.

    python3 tools/deps.py lock [--hold NAME==VERSION]  # newest versions (but those held) -> requirements-lock.txt
    python3 tools/deps.py latest [ARGS]                # newest versions in .venv-latest, pytest ARGS, what broke what

`make` installs from requirements-lock.txt (pip constraints: every package of the environment the suite passed on,
pinned), so a fresh machine gets the program CI saw. `lock` and `latest` are the two ways out of it: `latest` reports
which packages moved and which failing tests each one breaks (it puts each moved package back to its locked version
alone and reruns the failures); `lock` then records the new environment once `make test` passes on it.

torch stays at its pin in both (with the triton its CUDA build requires): the CPU and CUDA builds share that version,
and a newer torch from the registry would be the multi-GB CUDA build. Standard library only: it runs before any venv.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements-lock.txt"
TORCH = "torch==2.13.0"
# The CUDA build of that torch requires exactly this triton (the CPU build requires none, so the resolver here would
# pick the newest and the GPU install from the lock would then be impossible). Read from the CUDA wheel's metadata.
TORCH_CUDA_PINS = ["triton==3.7.1"]
EXTRAS = ".[dev,slurm]"
# Pinned for the GPU image (Dockerfile) but not resolvable on the CPU machines that write the lock. cuda-toolkit is
# what the CUDA wheel of TORCH requires exactly (its metadata: cuda-toolkit[cublas,cudart,...]==13.0.3): the CUDA the
# Dockerfile's base image must carry, so that DeepSpeed's ops and flash-attn compile for the torch they run with
# (tests/test_dockerfile.py compares the two).
GPU_ONLY_PINS = ["flash-attn==2.8.3.post2", "cuda-toolkit==13.0.3"]
HEADER = """\
# The environment `make test` passed on: pip constraints for every package, read by the Makefile, .ci/run (through
# make), the Dockerfile and the GPU check. Written by `python3 tools/deps.py lock` with {python} on {platform};
# do not edit by hand. Upgrade: `make test-latest`, then `make lock` and `make test`, and commit this file.
"""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """name -> version for each `name==version` line (local build labels such as +cpu dropped)."""
    pins = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#+]+)(\+\S+)?\s*", line)
        if match:
            pins[canonical(match[1])] = match[2]
    return pins


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def make_venv(venv: Path, hold: list[str] = ()) -> Path:
    """A venv with the newest versions pyproject.toml allows (torch at its pin, and `hold`'s pins), the project
    installed editable."""
    if not (venv / "bin" / "python").exists():
        run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip", "setuptools", "wheel"])
    run([str(python), "-m", "pip", "install", "-q", TORCH])
    upgrade = ["--upgrade", "--upgrade-strategy", "eager"]
    pins = [TORCH, *TORCH_CUDA_PINS, *hold]
    run([str(python), "-m", "pip", "install", "-q", *upgrade, *pins, "-e", EXTRAS], cwd=REPO)
    run([str(python), "-m", "pip", "check"])
    return python


def freeze(python: Path) -> dict[str, str]:
    out = run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable"], capture_output=True, text=True)
    return {name: version for name, version in read_pins(out.stdout).items() if name != "nopetrain"}


def lock(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="nopetrain-lock-") as scratch:
        python = make_venv(Path(scratch) / "venv", args.hold)
        pins = freeze(python)
        version = run([str(python), "-c", "import platform; print(platform.python_version())"], capture_output=True)
    header = HEADER.format(python=f"Python {version.stdout.decode().strip()}", platform=sys.platform)
    body = "".join(f"{name}=={pins[name]}\n" for name in sorted(pins))
    gpu = "# GPU only (the `gpu` extra; not installable on the CPU machines that write this file):\n"
    LOCK.write_text(header + body + gpu + "".join(f"{pin}\n" for pin in GPU_ONLY_PINS))
    print(f"wrote {LOCK.name}: {len(pins)} packages; now run `make test` on it and commit it")
    return 0


def failing_tests(python: Path, pytest_args: list[str], env: dict[str, str]) -> list[str] | None:
    """Node ids of the tests that failed or errored, from pytest's short summary (None when no test ran)."""
    cmd = [str(python), "-m", "pytest", "-q", "-rfE", *pytest_args]
    print("+", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode not in (0, 1):  # 2: interrupted or usage error, 5: no tests collected
        return None
    return list(dict.fromkeys(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.MULTILINE)))


def latest(args: argparse.Namespace) -> int:
    locked = read_pins(LOCK.read_text())
    venv = REPO / ".venv-latest"
    python = make_venv(venv)
    newest = freeze(python)
    moved = {name: (locked.get(name), version) for name, version in newest.items() if locked.get(name) != version}
    print(f"\n{len(moved)} of {len(newest)} packages differ from {LOCK.name}:")
    for name, (old, new) in sorted(moved.items()):
        print(f"  {name}: {old or '(not locked)'} -> {new}")
    env = dict(os.environ)
    # DeepSpeed's compiled ops depend on the venv's include paths: keep this venv's apart from .venv's.
    key = hashlib.md5(str(REPO).encode()).hexdigest()[:12]
    env["TORCH_EXTENSIONS_DIR"] = str(Path.home() / ".cache" / "nopetrain" / "torch_extensions" / f"{key}-latest")
    failed = failing_tests(python, args.pytest_args, env)
    if failed is None:
        print("pytest did not run: see its output above")
        return 2
    if not failed:
        print(f"\nall selected tests pass on the newest versions: `make lock` records them ({len(moved)} moved)")
        return 0
    print(f"\n{len(failed)} failing on the newest versions; putting each moved package back alone:")
    culprits = {}
    for name, (old, new) in sorted(moved.items()):
        if old is None or name in ("pip", "setuptools", "wheel"):
            continue
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"{name}=={old}"])
        still = failing_tests(python, failed, env)
        run([str(python), "-m", "pip", "install", "-q", "--no-deps", f"{name}=={new}"])
        fixed = sorted(set(failed) - set(failed if still is None else still))
        if fixed:
            culprits[name] = (old, new, fixed)
    print("\nWhat broke what:")
    for name, (old, new, fixed) in culprits.items():
        print(f"  {name} {old} -> {new} breaks:")
        for test in fixed:
            print(f"    {test}")
    unexplained = sorted(set(failed) - {test for *_, fixed in culprits.values() for test in fixed})
    for test in unexplained:
        print(f"  no single package explains: {test}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    locker = commands.add_parser("lock", help="write requirements-lock.txt from the newest versions")
    locker.add_argument("--hold", action="append", default=[], metavar="NAME==VERSION", help="keep NAME at VERSION")
    locker.set_defaults(func=lock)
    newest = commands.add_parser("latest", help="run pytest on the newest versions and name what broke what")
    newest.add_argument("pytest_args", nargs=argparse.REMAINDER, help="passed to pytest (default: the whole suite)")
    newest.set_defaults(func=latest)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
