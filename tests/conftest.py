"""Shared pytest fixtures: the session's tiny corpus, its shards and its tiny random teachers; and the check that
only tests marked `procgroup` start process groups (tests/helpers.py)."""

from __future__ import annotations

import sys

import pytest

from tests import helpers

# ---- the procgroup marker: recorded for the helpers that start ranks, checked in process ----------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Records the running test around its setup, call and teardown.

    NOTE: a hook, not an autouse fixture: a module-scoped fixture (a shared training run) is set up before any
    function-scoped fixture, and the helpers it calls must already know the test that needs it.
    """
    helpers.record_running_test(item)
    try:
        return (yield)
    finally:
        helpers.record_running_test(None)


@pytest.fixture(autouse=True)
def _no_process_group_in_an_unmarked_test(request):
    """A test that initialised torch.distributed in this process is marked `procgroup` too."""
    yield
    dist = sys.modules.get("torch.distributed")
    marked = request.node.get_closest_marker(helpers.PROCGROUP) is not None
    if not marked and dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # the next tests start clean
        pytest.fail(f"{request.node.nodeid} initialised a process group but is not marked @pytest.mark.procgroup")


# ---- data: one tiny corpus and its shards for the whole session -------------------------

#: The tiny corpus: 3 speakers x 1 book x 4 files of 2-6 s (synthesized, seconds to make).
DEMO_CORPUS = dict(speakers=3, books=1, files=4, seconds=6.0, seed=7, engine="synth")
#: Its sharding: 3 s VAD windows, spread over >= 8 shards per split, 1 validation speaker.
DEMO_SHARDING = dict(max_seconds=3.0, min_seconds=0.5, min_shards=8, valid_speakers=1)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """Path of a tiny LibriLight-layout corpus (DIR/small/<speaker>/<book>/<name>.flac + .json)."""
    from istack_ds.data.demo_corpus import make_corpus

    root = tmp_path_factory.mktemp("demo_corpus")
    make_corpus(root, log=lambda *_: None, **DEMO_CORPUS)
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_corpus, tmp_path_factory):
    """Path of the shards of `demo_corpus`: train/index.json (2 speakers, 8 shards) and valid/index.json."""
    from istack_ds.data.writer import shard_corpus

    out = tmp_path_factory.mktemp("demo_shards")
    shard_corpus(demo_corpus, out, log=lambda *_: None, **DEMO_SHARDING)
    return out


# ---- teachers: each tiny random teacher built once a session -------------------------------------------


@pytest.fixture(scope="session")
def make_teacher(tmp_path_factory):
    """make_teacher(model_type="hubert", **options): the directory of a tiny random teacher of that family
    (`options`: make_random_teacher's keywords, e.g. do_normalize, feat_extract_norm), built on its first
    request and shared by every later one. Tests only read it: one that needs to change a teacher copies it."""
    from istack_ds.models.teacher import make_random_teacher

    built: dict[tuple, object] = {}

    def make(model_type: str = "hubert", **options):
        key = (model_type, *sorted(options.items()))
        if key not in built:
            out = tmp_path_factory.mktemp(f"teacher_{model_type}") / model_type
            built[key] = make_random_teacher(out, size="tiny", model_type=model_type, **options)
        return built[key]

    return make


@pytest.fixture(scope="session")
def teacher_dir(make_teacher):
    """The tiny random HuBERT teacher (8 layers of width 96) most tests train against or load."""
    return make_teacher()
