"""Shared pytest fixtures."""

from __future__ import annotations

import pytest

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
