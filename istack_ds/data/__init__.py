"""The data side: LibriLight -> VAD-window cuts -> WebDataset shards + index -> streamed batches.

- :mod:`istack_ds.data.corpus`: a small synthetic corpus in LibriLight layout (the demo, tests).
- :mod:`istack_ds.data.librilight`: LibriLight layout -> lhotse manifests -> VAD-window cuts per split (lazy).
- :mod:`istack_ds.data.shards`: cuts -> shards + index.json (parallel writers); reading members back.
- :mod:`istack_ds.data.stream`: shards -> split by node, rank, worker -> bucketed batches with a resumable position.

This package never imports the model. ``stream`` (torch, lhotse) is imported lazily
so that tools that only shard a corpus stay light.
"""

from istack_ds.data.shards import DataError, ShardIndex, ShardInfo, read_index

__all__ = ["DataError", "ShardIndex", "ShardInfo", "read_index", "build_loader"]


def __getattr__(name):
    if name == "build_loader":
        from istack_ds.data.stream import build_loader

        return build_loader
    raise AttributeError(name)
