"""Train a small HuBERT teacher on a labelled espeak-ng speech corpus (CPU, minutes), cached.

Usage (`python tools/train_teacher.py` takes the same arguments):
    istack train-teacher --out data/teacher                       # corpus in data/speech_corpus (made if absent)
    istack train-teacher --out /tmp/t --corpus /tmp/c --speakers 4 --utterances 6 --steps 5   # a smoke run
    OMP_NUM_THREADS=2 istack train-teacher --out data/teacher --steps 600 --seed 1

First writes (or reuses) the labelled corpus (istack_ds/evidence/speech_corpus.py: espeak-ng voices
as speakers, text, phonemes) unless --corpus already holds lhotse manifests, then trains a
12-layer HuBERT (hidden 96, 4 heads, FFN 384, 32-channel CNN) with CTC on phonemes
(istack_ds/evidence/teacher_training.py says why) and saves it where `teacher.path` can point:
OUT/config.json, model.safetensors, preprocessor_config.json, plus the CTC head
(ctc_head.safetensors, phonemes.json), teacher_report.json (PER and speaker probe on held-out
speakers, layer x layer CKA, training time) and layer_cka.png. Re-running with the same
settings on the same corpus reuses OUT; --force retrains. Needs espeak-ng to make the corpus.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from istack_ds.commands import HelpFormatter

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv=None, prog: str | None = None) -> int:
    from istack_ds.evidence.speech_corpus import EspeakMissing, SpeechCorpusSettings, make_speech_corpus
    from istack_ds.evidence.teacher_training import TeacherTrainingSettings, train_teacher

    t, c = TeacherTrainingSettings(), SpeechCorpusSettings()
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="teacher directory to write (save_pretrained layout)")
    p.add_argument("--corpus", default="data/speech_corpus", help="labelled lhotse manifest directory (made if absent)")
    p.add_argument("--speakers", type=int, default=c.speakers, help="speakers of a corpus made here")
    p.add_argument("--utterances", type=int, default=c.utterances, help="sentences per speaker of a corpus made here")
    p.add_argument("--corpus-seed", type=int, default=c.seed, help="seed of a corpus made here (voices, texts)")
    p.add_argument("--steps", type=int, default=t.steps, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help="utterances per step")
    p.add_argument("--lr", type=float, default=t.lr, help="peak learning rate")
    p.add_argument("--layers", type=int, default=t.num_hidden_layers, help="transformer layers")
    p.add_argument("--hidden-size", type=int, default=t.hidden_size, help="transformer width")
    p.add_argument("--heads", type=int, default=t.num_attention_heads, help="attention heads")
    p.add_argument("--ffn", type=int, default=t.intermediate_size, help="feed-forward width")
    p.add_argument("--conv-channels", type=int, default=t.conv_channels, help="channels of the CNN front end")
    p.add_argument("--mask-prob", type=float, default=t.mask_prob, help="masked-span start fraction; 0: no masking")
    p.add_argument(
        "--held-out-speakers",
        type=int,
        default=t.held_out_speakers,
        help="speakers kept out of training (the report's test set)",
    )
    p.add_argument("--seed", type=int, default=t.seed, help="seed of the initialisation and the batches")
    p.add_argument("--log-every", type=int, default=t.log_every, help="steps between progress lines")
    p.add_argument("--force", action="store_true", help="retrain even when OUT holds a matching teacher")
    args = p.parse_args(argv)

    corpus = Path(args.corpus)
    if not (corpus / "supervisions.jsonl.gz").is_file() or (corpus / "corpus.json").is_file():
        # a corpus this project made is (re)checked, so changed settings take effect; a foreign one is used as is
        try:
            make_speech_corpus(
                corpus,
                SpeechCorpusSettings(speakers=args.speakers, utterances=args.utterances, seed=args.corpus_seed),
                progress_stream=sys.stdout,
            )
        except EspeakMissing as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    settings = TeacherTrainingSettings(
        hidden_size=args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        intermediate_size=args.ffn,
        conv_channels=args.conv_channels,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mask_prob=args.mask_prob,
        held_out_speakers=args.held_out_speakers,
        seed=args.seed,
        log_every=args.log_every,
    )
    report = train_teacher(corpus, args.out, settings, force=args.force, log=lambda m: print(m, flush=True))
    print(
        f"teacher: {args.out} (PER {report['per']:.3f}, CKA(4, {settings.num_hidden_layers}) "
        f"{report['cka_4_12']:.3f}, trained in {report['train_seconds']:.0f} s); report "
        f"{Path(args.out) / 'teacher_report.json'}, figure {Path(args.out) / 'layer_cka.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
