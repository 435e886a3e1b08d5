import gc
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
# imported now, before any test module imports a library: it keeps the session's environment as it started
# (helpers.env(): the launches' environment, the same in pytest-xdist's controller and in each of its workers)
from tests.integration import helpers as _helpers  # noqa: E402,F401


@pytest.fixture
def root() -> Path:
    return ROOT


def _runs_integration(config) -> bool:
    """Whether the command line names the integration tests (or a folder holding them)."""
    integration = ROOT / "tests" / "integration"
    for arg in config.args:
        path = Path(arg.split("::")[0]).resolve()
        if path == integration or integration in path.parents or path in integration.parents:
            return True
    return False


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collection imports torch, DeepSpeed and TerraTorch: no cyclic garbage collection meanwhile, and what it built
    (it lives for the whole session) frozen afterwards, out of every later collection of the in-process tests (as
    `trainer.runtime.pause_gc_for_start_up` does for a training process)."""
    from trainer.runtime import gc_after_start_up

    gc.disable()
    try:
        return (yield)
    finally:
        gc_after_start_up()


def pytest_collection_finish(session):
    """Start the warm zygote of the integration tests (tests/integration/warm.py) now, so its imports overlap the
    first tests instead of delaying the first warm launch (under pytest-xdist the controller has already started
    the workers' shared one: `warm.share`, and this does nothing)."""
    if any("integration" in item.nodeid.split("/")[:2] for item in session.items):
        from tests.integration import helpers, warm

        warm.prestart(helpers.env())


# Files whose tests take longest (measured with --durations on the CI machine), run first: `pytest -n 2 --dist
# loadfile` hands whole files to the two workers in collection order, so a long file collected last would run
# alone at the end while the other worker idles. Only the order of files changes; tests inside a file keep theirs.
# (names of files in tests/integration/)
LONGEST_FIRST = ("test_sweep.py", "test_multinode.py", "test_train_resume.py", "test_warm.py", "test_chaos.py",
                 "test_big_load.py", "test_launch_signals.py", "test_predict_small_export.py",
                 "test_docker_entrypoint.py", "test_terratorch_configs.py", "test_profiles_train.py",
                 "test_planner_validation.py", "test_bench_report.py", "test_tasks_e2e.py")


# ... and these after the other integration files, before the unit tests: the zero3_nvme run needs DeepSpeed's
# async_io op, which `.ci/run` compiles beside the tests (4-6 min); collected first, it would hold a worker waiting
# for the compile, and collected last it would run alone while the other worker idles. The unit tests (many short
# files) then even out the two workers' ends.
AFTER_INTEGRATION = ("test_profile_nvme.py",)


def pytest_configure(config):
    # pytest-xdist's loadfile scheduler re-sorts files by their number of tests unless told not to (its default
    # --loadscope-reorder): a one-test 90-second file then runs last, alone. Keep the order below.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False
    # pytest-xdist's controller, before it starts its workers: one warm zygote for both (each would otherwise
    # import torch/DeepSpeed/TerraTorch for its own, 15-20 s of CPU apiece)
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput") and _runs_integration(config):
        from tests.integration import helpers, warm

        warm.share(helpers.env())


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}

    def key(item) -> int:
        if item.path.parent.name != "integration":
            return len(rank) + 2
        return len(rank) + 1 if item.path.name in AFTER_INTEGRATION else rank.get(item.path.name, len(rank))

    items.sort(key=key)  # stable: the rest keep pytest's order
