"""Shared test setup: no network, fixed threads, project root importable."""
import os
import sys

import pytest

# No hub access on CI machines: fail fast instead of retrying downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Under pytest-xdist (`make test` runs `pytest -n auto`), each worker is one process of the suite: it uses ONE
# thread for torch and passes that on to the scripts the tests start, so that N workers share N cores instead of
# oversubscribing them (set before torch is imported by any test module).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items):
    """List the tests marked slow first (stable sort: file order otherwise). pytest-xdist's loadgroup hands out
    the `xdist_group` units first, largest first, then the other tests in this order: the long ones start early
    and the short ones fill the tail, instead of one long test running alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that runs a script's main() in the worker (which may call torch.set_num_threads, e.g. --threads 2)
    must not leave the worker on more threads than its share of the cores for every test after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that leaves a (fake) process group initialized makes every later in-process training in its worker
    believe it is distributed: the tiny SFT then logged 1/8 of its loss (an 8-rank fake group's all-reduce mean).
    The test that leaves one errors here, and the group is ended so the tests after it run as they would alone."""
    import torch.distributed as dist

    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialized (end it in a finally)")
