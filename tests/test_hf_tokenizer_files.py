"""The tokenizer files of a run directory are Hugging Face's: `tokenizers` and transformers'
AutoTokenizer read them and give ringpipe's ids; run directories in ringpipe's earlier format load."""
import json

import numpy as np
import pytest
import tokenizers

from ringpipe.model.gpt2.config import GPTConfig
from ringpipe.model.gpt2.model import GPT
from ringpipe.model.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer, make_tokenizer

CORPUS = ("To be, or not to be: that is the question.\n\tWhether 'tis nobler\r\n"
          "naïve café — Ünïcödé ✓ 漢字 😀 e\u0301 \u200b  three   spaces\n\n")
TEXTS = ["", "To be", "\n", "  \t\r\n\n", "café ✓ 漢字", "😀😀 e\u0301", CORPUS, CORPUS * 3]
# Byte-level text may hold anything UTF-8 can.
BYTE_TEXTS = TEXTS + ["\x00\x7f\u0100 \ufeff\U0010ffff", "Ωμέγα Ελληνικά", "\u0100\u0120\u00ff"]


def saved(tmp_path, kind):
    tokenizer = make_tokenizer(kind, CORPUS)
    tokenizer.save(str(tmp_path))
    return tokenizer


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_saved_files_are_the_hugging_face_tokenizer_files(tmp_path, kind):
    saved(tmp_path, kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    spec = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert spec["added_tokens"] == [] and spec["model"]["type"] in ("WordLevel", "BPE")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_the_tokenizers_library_gives_ringpipes_ids_and_text(tmp_path, kind):
    ours = saved(tmp_path, kind)
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert theirs.get_vocab_size() == ours.vocab_size
    for text in BYTE_TEXTS if kind == "byte" else TEXTS:
        ids = ours.encode(text).tolist()
        assert theirs.encode(text).ids == ids, text
        assert theirs.decode(ids) == ours.decode(ids) == text


def test_a_character_outside_the_vocabulary_is_refused_by_both(tmp_path):
    ours = saved(tmp_path, "char")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ("Z", "to be Z", "🙂"):
        with pytest.raises(ValueError, match="not in the char tokenizer's vocabulary"):
            ours.encode(text)
        with pytest.raises(Exception, match="Missing \\[UNK\\] token"):
            theirs.encode(text)


def test_invalid_utf8_byte_ids_decode_alike(tmp_path):
    ours = saved(tmp_path, "byte")
    theirs = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for ids in ([0xC3], [0xFF, 0x41], [0xE2, 0x9C], [0x41, 0xC3, 0xC3, 0xA9, 0x80]):
        assert theirs.decode(ids) == ours.decode(ids), ids


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_ringpipe_reads_its_hugging_face_files_back(tmp_path, kind):
    ours = saved(tmp_path, kind)
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded) is type(ours) and loaded.vocab_size == ours.vocab_size
    np.testing.assert_array_equal(loaded.encode(CORPUS), ours.encode(CORPUS))


# Literal tokenizer.json files of run directories written before the Hugging Face files.
OLD_FORMAT = {"char": '{"type": "char", "chars": "\\n !,.:;?Tabehinoqrstuw\\u00e9"}',
              "byte": '{"type": "byte"}'}


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_run_directories_in_ringpipes_earlier_format_still_load(tmp_path, kind):
    (tmp_path / "tokenizer.json").write_text(OLD_FORMAT[kind])
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.type == kind
    if kind == "char":
        assert loaded.chars == "\n !,.:;?Tabehinoqrstuwé"
        assert loaded.encode("To be").tolist() == [8, 15, 1, 10, 11]
    else:
        assert loaded.encode("é").tolist() == [0xC3, 0xA9]


def test_a_hugging_face_tokenizer_other_than_char_or_byte_is_held_by_tokenizers(tmp_path):
    # Anything else (a trained BPE, a tokenizer directory) keeps the ids `tokenizers` gives it:
    # tests/test_bpe_and_hf_tokenizers.py.
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"to": 0, "be": 1}, unk_token="to"))
    other.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.type == "hf" and loaded.encode("be").tolist() == [1]


# ------------------------------------------------------------------ transformers

@pytest.mark.parametrize("kind", ["char", "byte"])
def test_auto_tokenizer_opens_a_run_directory_with_ringpipes_ids(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    ours = make_tokenizer(kind, CORPUS)
    # A run directory's final model: weights, config.json (model_type gpt2) and tokenizer files.
    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=ours.vocab_size)) \
        .save_pretrained(tmp_path, tokenizer=ours)
    for cls in (transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast):
        theirs = cls.from_pretrained(tmp_path)
        assert len(theirs) == ours.vocab_size
        for text in BYTE_TEXTS if kind == "byte" else TEXTS:
            ids = ours.encode(text).tolist()
            assert theirs(text)["input_ids"] == ids, (cls.__name__, text)
            assert theirs.decode(ids) == text
