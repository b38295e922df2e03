"""The report tokenizer at MIMIC-CXR scale: how long `train_tokenizer` takes on ~377k distinct reports,
and how much of it is cxrjax's determinism pre-pass (`continuing_characters` in cxrjax/text/tokenizer.py)
before the Hugging Face trainer.

    python benchmarks/tokenizer_bench.py                      # 377,110 reports (MIMIC-CXR's count), vocab 8000
    python benchmarks/tokenizer_bench.py --reports=50000
    python benchmarks/tokenizer_bench.py --per_report         # also the pre-pass's first version, and equal?
    python benchmarks/tokenizer_bench.py --reports=10000 --alphabet=6000 --per_report  # a large alphabet

The corpus: the real Indiana University reports (../shared/data/iu-reports, or --iu_reports) split into
sentences and recombined at random into reports of as many sentences as the originals (a fixed seed),
so the vocabulary and sentence statistics are real radiology text and almost every report is distinct
(MIMIC-CXR's are). Without the IU file (a fresh clone) the sentences come from the reports of a
300-patient phantom (cxrjax.data.phantom). Prints the wall time of the pre-pass alone and of the whole
`train_tokenizer`, the vocabulary size and peak RSS.
"""

from __future__ import annotations

import argparse
import re
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IU = REPO.parent / "shared" / "data" / "iu-reports" / "NLMCXR_reports.tgz"
MIMIC_REPORTS = 377_110  # MIMIC-CXR v2.0.0's free-text reports (Johnson et al. 2019)

SMOKE_ARGS = ["--reports=300", "--vocab=300", "--per_report"]  # tests/test_benchmarks.py


def source_reports(iu_path: Path) -> tuple[list[str], str]:
    if iu_path.is_file():
        from cxrjax.data import metadata

        df = metadata.load_openi_reports(iu_path)
        texts = [t for t in df["report"].astype(str) if t.strip()]
        return texts, f"{len(texts):,} IU reports ({iu_path})"
    from cxrjax.data.phantom import table

    texts = table.make_table(300)["report"].drop_duplicates().tolist()  # one report per study
    return texts, f"{len(texts):,} phantom reports (no IU file here)"


def recombined(texts: list[str], n: int, seed: int = 0) -> list[str]:
    """`n` reports, each as many sentences (drawn from the originals' lengths) picked at random from all."""
    split = [[s.strip() for s in re.split(r"(?<=[.!?])\s+", t) if s.strip()] for t in texts]
    sentences = [s for ss in split for s in ss]
    lengths = np.array([len(ss) for ss in split if ss])
    rng = np.random.default_rng(seed)
    k = rng.choice(lengths, size=n)
    picks = rng.integers(0, len(sentences), size=int(k.sum()))
    out, i = [], 0
    for m in k:
        out.append(" ".join(sentences[j] for j in picks[i:i + m]))
        i += m
    return out


def ideograph_reports(n: int, alphabet: int, seed: int = 0) -> list[str]:
    """`n` reports of 20 space-separated words of 2-6 characters from the first `alphabet` CJK ideographs."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 7, size=(n, 20))
    chars = rng.integers(0x4E00, 0x4E00 + alphabet, size=int(lengths.sum()))
    text = "".join(map(chr, chars))
    out, i = [], 0
    for row in lengths:
        words = []
        for k in row:
            words.append(text[i:i + k])
            i += k
        out.append(" ".join(words))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reports", type=int, default=MIMIC_REPORTS)
    p.add_argument("--alphabet", type=int, default=0,
                   help="> 0: instead of English text, reports of 20 words of 2-6 characters drawn from this many "
                        "CJK ideographs (a large alphabet: every one of them ends up a continuing character)")
    p.add_argument("--vocab", type=int, default=8000, help="vocabulary size (the MVLM configs' text.vocab_size)")
    p.add_argument("--iu_reports", default=str(IU))
    p.add_argument("--per_report", action="store_true",
                   help="also time the pre-pass's first version (the pre-tokeniser over every report) and "
                        "check that both find the same characters")
    args = p.parse_args(argv)

    from tokenizers import Tokenizer, models

    from cxrjax.text import tokenizer as tok_lib

    t = time.perf_counter()
    if args.alphabet:
        corpus, what = ideograph_reports(args.reports, args.alphabet), f"{args.alphabet:,} CJK ideographs"
    else:
        base, what = source_reports(Path(args.iu_reports))
        corpus = recombined(base, args.reports)
        what = "the sentences of " + what
    distinct = len(set(corpus))
    print(f"corpus: {len(corpus):,} reports ({distinct:,} distinct, {sum(map(len, corpus)) / 2**20:.0f} MB of text) "
          f"made from {what} in {time.perf_counter() - t:.1f} s")

    probe = tok_lib._pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))  # train_tokenizer's normaliser etc.
    t = time.perf_counter()
    chars = tok_lib.continuing_characters(probe, corpus)
    pre_s = time.perf_counter() - t
    print(f"determinism pre-pass (continuing_characters): {pre_s:.1f} s ({len(chars)} characters)", flush=True)
    if args.per_report:  # the first version: the pre-tokeniser over every normalised report, in Python
        t = time.perf_counter()
        words = (w for text in set(corpus) for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(text)))
        slow = sorted({c for w in words for c in w[1:]})
        print(f"per-report pre-pass: {time.perf_counter() - t:.1f} s, "
              f"{'the same' if slow == chars else 'NOT the same'} {len(slow)} characters")
        if slow != chars:
            return 1

    t = time.perf_counter()
    tok = tok_lib.train_tokenizer(corpus, vocab_size=args.vocab)
    total_s = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"train_tokenizer (pre-pass + Hugging Face trainer + rebuild): {total_s:.1f} s, vocabulary "
          f"{tok.get_vocab_size():,} (asked {args.vocab:,}); pre-pass {pre_s / total_s:.0%} of it; "
          f"peak RSS {rss:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
