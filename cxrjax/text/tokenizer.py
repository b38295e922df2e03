"""The report tokenizer: a lower-cased WordPiece trained on the run's training reports only.

Trained with Hugging Face `tokenizers` (no model hub involved), saved as `tokenizer.json` in the run's
workdir and loaded from there on resume and by the eval jobs, so a checkpoint always travels with
the vocabulary it was trained with. Special tokens have fixed ids:

    [PAD]=0  [CLS]=1  [SEP]=2  [MASK]=3  [UNK]=4

Reports are encoded without special tokens (the masked vision-language model owns the single [CLS]
of the joint sequence) followed by one [SEP], truncated to `max_len`, padded with [PAD].
"""

from __future__ import annotations

import re
import string
import sys
import unicodedata
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]")
PAD_ID, CLS_ID, SEP_ID, MASK_ID, UNK_ID = range(len(SPECIAL_TOKENS))
FILENAME = "tokenizer.json"


def _pipeline(tok: Tokenizer) -> Tokenizer:
    """BERT's normalisation (lower-case, accents stripped), whitespace + punctuation split, ## decoding."""
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=True,
                                                lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
    """A lower-cased WordPiece (BERT normalisation, whitespace + punctuation split) fitted on `texts`;
    the same texts give the same vocabulary, ids included, in every process."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty report text to train on (does the split have reports?)")
    tok = _pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)))
    # Determinism (huggingface/tokenizers#1794, still so in 0.23.3): the trainer gives the "##c" continuing
    # pieces ids in hash-map order, and those ids break ties between merges of equal count, so two runs on
    # the same reports differed in ~100 of 800 pieces. Registered up front (sorted) they get fixed ids;
    # exactly the ones the trainer would create (characters after a word's first), so none takes a place
    # of the vocabulary budget a learned piece would have had. The model below is rebuilt from the
    # vocabulary, so they are ordinary pieces afterwards.
    continuing = ["##" + c for c in continuing_characters(tok, texts)]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS) + continuing, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Every lower-case ASCII character, word-initial and continuing, is a piece: any ASCII report
    # round-trips without [UNK] (adds at most 2 x 68 entries to the vocabulary).
    vocab = tok.get_vocab()
    for c in string.ascii_lowercase + string.digits + string.punctuation:
        for piece in (c, "##" + c):
            vocab.setdefault(piece, len(vocab))
    tok = _pipeline(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100)))
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for i, s in enumerate(SPECIAL_TOKENS):  # the trainer puts special tokens first; the model relies on it
        if tok.token_to_id(s) != i:
            raise RuntimeError(f"tokenizers placed {s} at id {tok.token_to_id(s)}, expected {i}")
    return tok


def continuing_characters(tok: Tokenizer, texts: Iterable[str]) -> list[str]:
    """The characters that follow another inside a word of `tok`'s normalised, pre-tokenised `texts`
    (sorted): those the WordPiece trainer makes "##c" pieces of.

    Without running the pre-tokeniser over every report (36 s for MIMIC-CXR's 377k in Python,
    benchmarks/tokenizer_bench.py). BERT's normaliser acts on each character alone (control characters
    dropped, whitespace to " ", accents stripped, lower-cased) except for the canonical reordering of
    adjacent combining marks, so the reports are normalised by a table of their distinct characters,
    and only those with a character that normalises to a combining mark are normalised whole. The
    pre-tokeniser splits at whitespace and isolates punctuation, so a character follows another inside
    a word exactly when both are neither (each character classified by the pre-tokeniser itself): one
    pass over the code points, linear in the corpus whatever its alphabet."""
    texts = set(texts)
    table = {c: tok.normalizer.normalize_str(c) for c in set("".join(texts))}
    marks = [c for c, n in table.items() if any(_reorderable(d) for d in n)]
    whole = set()
    if marks:
        has_mark = re.compile("[" + "".join(re.escape(c) for c in marks) + "]")
        whole = {t for t in texts if has_mark.search(t)}
    # "\n": whitespace, so no word spans two reports
    normalised = "\n".join(texts - whole).translate({ord(c): n for c, n in table.items()})
    normalised += "\n" + "\n".join(tok.normalizer.normalize_str(t) for t in whole)

    def in_word(c: str) -> bool:  # neither whitespace nor punctuation to the pre-tokeniser
        return [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(f"a{c}a")] == [f"a{c}a"]

    is_word = np.zeros(sys.maxunicode + 1, bool)
    is_word[[ord(c) for c in set(normalised) if in_word(c)]] = True
    follows_word = np.zeros(sys.maxunicode + 1, bool)
    chunk = 1 << 24  # code points per pass (64 MiB as UTF-32); each chunk starts one back, to pair across
    for i in range(0, len(normalised), chunk):
        code = np.frombuffer(normalised[max(0, i - 1) : i + chunk].encode("utf-32-le"), np.uint32)
        w = is_word[code]
        follows_word[code[1:][w[1:] & w[:-1]]] = True
    return [chr(c) for c in np.flatnonzero(follows_word)]


def _reorderable(c: str) -> bool:
    """A combining mark (NFD may reorder it with its neighbours), or a character this Python does not know."""
    category = unicodedata.category(c)
    return unicodedata.combining(c) != 0 or category.startswith("M") or category == "Cn"


def save(tok: Tokenizer, directory):
    """WORKDIR/tokenizer.json; a local path or a URL (gs://..., through etils.epath)."""
    from etils import epath

    path = epath.Path(directory) / FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tok.to_str())
    return path


def load(directory_or_file) -> Tokenizer:
    """The tokenizer saved with a run (`WORKDIR/tokenizer.json`, local or a URL), offline."""
    from etils import epath

    path = epath.Path(directory_or_file)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the tokenizer is written to the run's workdir when a masked "
                                "vision-language run starts; pass that workdir (or its tokenizer.json)")
    tok = Tokenizer.from_str(path.read_text())
    for i, s in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(s) != i:
            raise ValueError(f"{path}: special token {s} has id {tok.token_to_id(s)}, expected {i} "
                             "(not a cxrjax report tokenizer)")
    return tok


def encode(tok: Tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Reports -> (ids int32 (N, max_len), valid bool (N, max_len)): word pieces + [SEP], truncated, padded."""
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    ids = np.full((len(texts), max_len), PAD_ID, np.int32)
    for i, enc in enumerate(tok.encode_batch(list(texts), add_special_tokens=False)):
        pieces = enc.ids[: max_len - 1] + [SEP_ID]
        ids[i, : len(pieces)] = pieces
    return ids, ids != PAD_ID


def decode(tok: Tokenizer, ids: Sequence[int]) -> str:
    """Token ids -> text; special tokens ([PAD], [SEP], ...) are dropped."""
    return tok.decode([int(i) for i in ids], skip_special_tokens=True)


def normalized(tok: Tokenizer, text: str) -> str:
    """What a round trip through the tokenizer preserves: the normalised text, words re-joined."""
    return tok.decoder.decode([w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))])
