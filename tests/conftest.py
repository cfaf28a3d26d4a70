"""Shared pytest setup: the `slow` marker (skipped unless --runslow) and common fixtures."""

import os
import pathlib

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: fail fast instead of retrying

REPO = pathlib.Path(__file__).resolve().parents[1]
# One persistent XLA compilation cache for the whole test session, both pytest-xdist workers and every
# run a test starts (`launch/main.py` subprocesses inherit the environment): a program another test
# compiled is read back instead of compiled again. The same compiled programs, so the same numbers;
# it only saves time (tests/test_strategies_text.py: 55 s cold, 30 s warm). Set before jax is imported.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
DATA = pathlib.Path(os.environ.get("AGORA_JAX_DATA", REPO.parent / "shared" / "data"))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~20 s; runs with --runslow (CI runs them)")
    config.addinivalue_line("markers", "xdist_group(name): run on the pytest-xdist worker of the other tests "
                                       "of this group (registered here too, for runs without xdist)")


# Under pytest-xdist (`-n 2 --dist loadgroup`, the README's test command) the tests of one module run on
# one worker, so that its module-scoped fixtures (trained pools, compiled engines, converted checkpoints)
# are built once. The modules named here spread their tests over the workers instead: each test is long
# next to their shared setup. A test's own `xdist_group` mark wins.
SPREAD = {"test_real_models", "test_evolution"}


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__
        if module not in SPREAD and item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(module))
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root() -> pathlib.Path:
    """The benchmark files in ../shared/data (or $AGORA_JAX_DATA)."""
    if not DATA.is_dir():
        pytest.fail(f"benchmark data not found at {DATA}; set AGORA_JAX_DATA")
    return DATA
