"""What the whole suite shares: the small real corpus, and the file order for `make test`, which runs the files on
two pytest-xdist workers (`--dist loadfile`: a file and its module fixtures stay on one worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import build_corpus, set_one_rank_env

# Files that take longest, longest first (seconds of a serial run, 2-core machine): a long file handed out last
# would run alone at the end while the other worker idles.
LONGEST_FIRST = (
    "test_slurm.py",  # 310-415
    "test_slurm_multinode.py",  # two SLURM nodes, five jobs
    "test_trainer.py",  # 240
    "test_preemption.py",  # 190
    "test_exit_codes.py",  # 190
    "test_chaos.py",  # 170
    "test_curriculum_runs.py",  # 150
    "test_train_on_shards.py",  # 95
    "test_gpu_check.py",  # 90: the GPU profile's tiny experiment
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small default corpus (helpers.build_corpus), built once per worker: every test that uses it only reads
    it."""
    return build_corpus(tmp_path_factory.mktemp("corpus") / "default")


@pytest.fixture(scope="module")
def process_group():
    """A gloo group of one in this process, as `python train.py` makes, for the tests of a module that build real
    DeepSpeed engines in-process; the environment is restored after. DeepSpeed is imported here, not at collection."""
    from nopetrain.parallel import destroy_process_group, init_distributed

    with pytest.MonkeyPatch.context() as monkeypatch:
        set_one_rank_env(monkeypatch)
        env = init_distributed()
        yield env
        destroy_process_group(env)
