"""The data side: a corpus -> cuts -> WebDataset shards + index -> streamed batches.

- :mod:`istack_ds.data.corpora`: the corpus contract, one module per corpus (each with its ``detect()``, all
  listed in ``CORPORA``: a layout -> lhotse manifests -> cuts per split, lazily) and the plumbing they share.
- :mod:`istack_ds.data.demo_corpus`: a small synthetic corpus in LibriLight layout (the demo, tests).
- :mod:`istack_ds.data.index`: the index.json format and its digest, :class:`DataError`, and the rule of how many
  shards a split needs.
- :mod:`istack_ds.data.tario`: shard members (``<key>.flac`` + ``<key>.json``) written into and read from tars.
- :mod:`istack_ds.data.plan`: planning a sharding run: shard sizes and names, the keys met across splits.
- :mod:`istack_ds.data.writer`: cuts -> shards + index.json (parallel writers, resumable).
- :mod:`istack_ds.data.parts`: a split's index at the end: from one run, or merged from the parts of a run
  split over machines (``--part``).
- :mod:`istack_ds.data.shard_check`: checking shards back against their index.
- :mod:`istack_ds.data.progress`: the progress line of a sharding run.
- :mod:`istack_ds.data.position`: the one shard-assignment rule (node, rank, worker) and the position
  bookkeeping: where each worker resumes, the saved state's formats, what of a saved state is used.
- :mod:`istack_ds.data.batcher`: the pure batcher: shuffle buffer -> duration buckets -> batches.
- :mod:`istack_ds.data.stream`: shards -> this rank's worker's shards -> shard groups -> bucketed batches.
- :mod:`istack_ds.data.loader`: the loader the trainer iterates, which keeps its own state (``state_dict`` /
  ``load_state_dict`` / ``restore``): a resume continues batch for batch, and a position is used only with the
  index, seed, ranks and workers it was saved with.

This package never imports the model. ``loader`` (torch) is imported lazily
so that tools that only shard a corpus stay light.
"""

from istack_ds.data.index import DataError, ShardIndex, ShardInfo, check_shard_count, read_index

__all__ = ["DataError", "ShardIndex", "ShardInfo", "check_shard_count", "read_index", "build_loader"]


def __getattr__(name):
    if name == "build_loader":
        from istack_ds.data.loader import build_loader

        return build_loader
    raise AttributeError(name)
