"""The evidence about the method: the code that measures what growing a student does, apart from the code that
does it.

- :mod:`istack_ds.evidence.speech_corpus`: a labelled speech corpus spoken by espeak-ng (text, phonemes, speaker
  per utterance) as lhotse manifests, cached and deterministic for a seed.
- :mod:`istack_ds.evidence.teacher_training`: a small HuBERT teacher trained on it on CPU (CTC on phonemes,
  masked log-mel regression), saved as a plain ``save_pretrained`` directory; :mod:`~.teacher_data` holds its
  split and batches, :mod:`~.teacher_eval` its measurement and report (PER, layer CKA, speaker probe).
- :mod:`istack_ds.evidence.probe`: SUPERB-style probes (phoneme recognition, speaker identification, learned layer
  weights) of a frozen model; :mod:`~.probe_data` reads labelled shards through the model, :mod:`~.probe_heads`
  trains and scores the heads.
- :mod:`istack_ds.evidence.compare`: training runs compared from their TensorBoard logs (speed-ups at equal steps
  and at equal valid loss, the CKA figures).
- :mod:`istack_ds.evidence.claims`: the arithmetic that decides the paper's claims (step cost by depth, time to
  equal quality, intervals, verdicts) from finished runs.
- :mod:`istack_ds.evidence.ctc`: the CTC loss, greedy decoding and edit distance the probes and the teacher share.

The training path (``trainer.py``, ``engine.py``, ``data/``, ``growth/``, ``models/``) never imports this package;
it reads what training wrote (exports, checkpoints, TensorBoard logs, shards) and is reached through
``istack probe``, ``istack train-teacher``, ``istack compare`` and ``tools/run_paper_experiment.py``.
"""
