"""istack_ds: fast speech foundation model distillation by interleaved stacking, on DeepSpeed ZeRO.

The student starts shallow and grows during training; each growth clones layers
right after their originals (Kim & Lee, Interspeech 2026). See README.md.
"""

__version__ = "0.1.0"
