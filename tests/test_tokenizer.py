"""The report tokenizer: special-token ids, round trip, truncation/padding, save/load offline."""

import json
import subprocess
import sys

import numpy as np
import pytest

from cxrjax.text import tokenizer as T

CORPUS = [
    "FINDINGS: Moderate cardiomegaly, unchanged. Right pleural effusion, moderate, new since the prior study.",
    "IMPRESSION: No acute cardiopulmonary process. No pleural effusion or pneumothorax.",
    "Hazy opacity in the right upper lobe may represent consolidation; ET tube 4.5 cm above the carina.",
    "The cardiac silhouette and mediastinum size are within normal limits. There is no pulmonary edema.",
] * 5


@pytest.fixture(scope="module")
def tok():
    return T.train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


_TIES = """
import json, string, numpy as np
from tokenizers import Tokenizer, models, trainers
from cxrjax.text import tokenizer as T
r = np.random.default_rng(0)
words = ["".join(r.choice(list("abcdefghij"), r.integers(3, 8))) for _ in range(300)]
# every word twice (merges of equal count); punctuation and digits are words of their own after the split
texts = [" ".join(words[i:i + 10]) + ", 12 (no)." for i in range(0, 300, 10)] * 2
ours = [sorted(T.train_tokenizer(texts, 200, min_frequency=1).get_vocab().items()) for _ in range(4)]
plain = T._pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))  # tokenizers' trainer alone, as before
plain.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, min_frequency=1,
                                                           special_tokens=list(T.SPECIAL_TOKENS)))
vocab = plain.get_vocab()
for c in string.ascii_lowercase + string.digits + string.punctuation:
    for piece in (c, "##" + c):
        vocab.setdefault(piece, len(vocab))
print(json.dumps({"ours": ours, "plain": sorted(vocab.items())}))
"""


def _learned(vocab) -> int:
    """Pieces longer than one character (the merges), "##" not counted."""
    return sum(len(p.removeprefix("##")) > 1 for p, _ in vocab if not p.startswith("["))


def test_the_same_reports_give_the_same_vocabulary_in_every_run():
    # tokenizers' trainer alone gave a different vocabulary on most of these runs (huggingface/tokenizers#1794)
    runs = [json.loads(subprocess.run([sys.executable, "-c", _TIES], capture_output=True, text=True, check=True).stdout)
            for _ in range(2)]  # two processes (different hash seeds) x four trainings each
    vocabs = runs[0]["ours"] + runs[1]["ours"]
    assert all(v == vocabs[0] for v in vocabs)
    # ... and the same budget as the trainer alone: as many vocabulary entries and as many learned pieces
    # (none of the 200 places goes to a piece that cannot occur, e.g. "##," after the punctuation split)
    plain = runs[0]["plain"]
    assert len(vocabs[0]) == len(plain) > 250 and _learned(vocabs[0]) == _learned(plain) > 100


def test_special_tokens_have_fixed_ids(tok):
    assert [tok.token_to_id(s) for s in T.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (T.PAD_ID, T.CLS_ID, T.SEP_ID, T.MASK_ID, T.UNK_ID) == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("text", CORPUS[:4] + ["Xylophone-shaped density!? 12 mm (new)."])
def test_round_trip_gives_the_normalised_text(tok, text):
    ids, valid = T.encode(tok, [text], 128)
    assert T.UNK_ID not in ids[0]  # every lower-case ASCII character is in the vocabulary
    assert T.decode(tok, ids[0]) == T.normalized(tok, text)
    assert T.normalized(tok, text) == " ".join(T.normalized(tok, text).split())  # lower-cased, re-spaced
    assert T.normalized(tok, "No Pleural Effusion.") == "no pleural effusion."


def test_encode_truncates_appends_sep_and_pads(tok):
    ids, valid = T.encode(tok, [CORPUS[0], "no effusion", ""], 8)
    assert ids.shape == (3, 8) and ids.dtype == np.int32
    assert valid[0].all() and ids[0, -1] == T.SEP_ID  # truncated: 7 word pieces + [SEP]
    n = valid[1].sum()
    assert ids[1, n - 1] == T.SEP_ID and (ids[1, n:] == T.PAD_ID).all()
    assert valid[2].sum() == 1 and ids[2, 0] == T.SEP_ID  # an empty report is just [SEP]
    assert np.array_equal(valid, ids != T.PAD_ID)


def test_save_and_load_offline_give_the_same_ids(tok, tmp_path):
    path = T.save(tok, tmp_path)
    assert path.name == "tokenizer.json"
    again = T.load(tmp_path)
    a, _ = T.encode(tok, CORPUS[:4], 64)
    b, _ = T.encode(again, CORPUS[:4], 64)
    assert np.array_equal(a, b)


def test_load_refuses_missing_and_foreign_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        T.load(tmp_path)
    d = json.loads(tok.to_str())
    d["added_tokens"][0]["content"] = "<pad>"  # a tokenizer whose id 0 is not [PAD]
    d["model"]["vocab"]["<pad>"] = d["model"]["vocab"].pop("[PAD]")
    (tmp_path / "tokenizer.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"\[PAD\]"):
        T.load(tmp_path)


def test_training_needs_text():
    with pytest.raises(ValueError, match="no non-empty report"):
        T.train_tokenizer(["", "  "])


_UNICODE = ["Ångström café NAÏVE İstanbul straße", "tab\there\x00null\u200bzero-width ¿qué? «quote» — dash… end",
            "肺炎 left-lower lobe; T2/T3 4.5cm x-ray", "ﬁne ligature and Ⅻ numeral, ① circled", "e\u0301 combining",
            # adjacent combining marks that normalisation keeps and reorders (canonical order by combining class)
            "\u08d4\u1b44", "x \u302e\u0898 y"] * 2


def test_continuing_characters_are_the_ones_the_trainer_makes_pieces_of():
    from tokenizers import Tokenizer, models, trainers

    plain = T._pipeline(Tokenizer(models.WordPiece(unk_token="[UNK]")))  # tokenizers' trainer alone
    plain.train_from_iterator(_UNICODE + CORPUS, trainers.WordPieceTrainer(vocab_size=2000, min_frequency=1))
    made = sorted(p[2:] for p in plain.get_vocab() if p.startswith("##") and len(p) == 3)
    # ... and the pre-tokeniser run over every normalised report (the earlier, 10x slower way)
    words = [w for t in _UNICODE + CORPUS for w, _ in plain.pre_tokenizer.pre_tokenize_str(plain.normalizer.normalize_str(t))]
    assert T.continuing_characters(plain, _UNICODE + CORPUS) == made == sorted({c for w in words for c in w[1:]})
    assert {"ß", "炎", "i"} <= set(made) and not {"-", "…", "\u0301", "\u200b"} & set(made)
