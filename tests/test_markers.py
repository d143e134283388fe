"""The `procgroup` marker cannot be forgotten: the helpers that start ranks (tests/helpers.py) refuse to run in a
test without it, before any process starts."""

from types import SimpleNamespace

import pytest

from tests import helpers


def fake_test(marked: bool) -> SimpleNamespace:
    """What the helpers read of a pytest item: its node id and its closest `procgroup` marker."""
    marker = pytest.mark.procgroup.mark if marked else None
    return SimpleNamespace(
        nodeid="tests/test_x.py::test_y", get_closest_marker=lambda name: marker if name == "procgroup" else None
    )


@pytest.fixture
def running(request):
    """Records a fake test as the running one; this test is recorded again afterwards."""
    yield helpers.record_running_test
    helpers.record_running_test(request.node)


@pytest.mark.parametrize(
    "start",
    [
        lambda: helpers.torchrun("no_such_worker.py"),
        lambda: helpers.run_worker("no_such_worker.py", nproc=1),
        lambda: helpers.ranks_env(RANK="0"),
    ],
    ids=["torchrun", "run_worker", "ranks_env"],
)
def test_an_unmarked_test_that_starts_ranks_fails_naming_itself_and_the_marker(running, start):
    running(fake_test(marked=False))
    with pytest.raises(
        AssertionError, match=r"tests/test_x\.py::test_y starts a process group .* @pytest\.mark\.procgroup"
    ):
        start()


def test_a_marked_test_may_start_ranks(running):
    running(fake_test(marked=True))
    helpers.require_procgroup_marker("a check only")
    assert helpers.ranks_env(RANK="0")["RANK"] == "0"


def test_this_test_is_recorded_unmarked():
    """The conftest hook records every test, so a helper called here would refuse."""
    with pytest.raises(AssertionError, match="test_this_test_is_recorded_unmarked starts a process group"):
        helpers.require_procgroup_marker("a check only")
