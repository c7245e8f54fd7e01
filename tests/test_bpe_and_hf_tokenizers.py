"""`--tokenizer bpe --vocab-size N` trains a byte-level BPE saved as a real Hugging Face tokenizer;
`--tokenizer DIR` uses an existing Hugging Face tokenizer directory. Both train, resume and
generate, and their run directories open in transformers with the same ids."""
import json

import pytest
import tokenizers

from ringpipe.model.data.hf_tokenizer import END_OF_TEXT, train_bpe, with_special_tokens
from ringpipe.model.data.tokenizer import load_tokenizer, make_tokenizer
from ringpipe.model.gpt2.model import GPT
from tests.conftest import TEXT
from tests.test_train import TINY_FLAGS, run_cli

SAMPLES = ["", "3 little pigs", "  two  spaces\n\n\tand tabs", "naïve café ✓ 漢字 😀",
           "\x00\x7f\u0100", "<|endoftext|> is special", TEXT[:400]]


def gpt2_tokenizer_directory(path, vocab_size=300):
    """A GPT-2-style BPE built by `tokenizers` and saved by transformers' GPT2TokenizerFast."""
    transformers = pytest.importorskip("transformers", reason="saving needs transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    saved = transformers.GPT2TokenizerFast(tokenizer_object=bpe, bos_token=END_OF_TEXT,
                                           eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
    saved.save_pretrained(str(path))
    return str(path)


def test_bpe_trains_to_the_requested_vocabulary_size_and_round_trips_any_text():
    bpe = train_bpe(TEXT, 300)
    assert bpe.vocab_size == 300
    for text in SAMPLES:
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode("0 little pigs went to market")) < len("0 little pigs went to market") / 2


def test_bpe_on_a_small_corpus_stops_when_nothing_is_left_to_merge():
    assert 257 <= train_bpe("abab", 1000).vocab_size < 300


@pytest.mark.parametrize("size", [256, 65537])
def test_a_bpe_vocabulary_size_out_of_range_is_refused_by_name(size):
    with pytest.raises(ValueError, match=f"BPE vocabulary size {size} must be between 257"):
        train_bpe(TEXT, size)


def test_bpe_without_a_vocabulary_size_is_refused():
    with pytest.raises(ValueError, match="needs a vocabulary size"):
        make_tokenizer("bpe", TEXT)


def test_saved_bpe_loads_in_transformers_with_the_same_ids(tmp_path):
    transformers = pytest.importorskip("transformers", reason="comparing needs transformers")
    ours = train_bpe(TEXT, 300)
    ours.save(str(tmp_path))
    for cls in (transformers.AutoTokenizer, transformers.GPT2TokenizerFast):
        theirs = cls.from_pretrained(str(tmp_path))
        assert len(theirs) == ours.vocab_size and theirs.eos_token == END_OF_TEXT
        for text in SAMPLES:
            ids = ours.encode(text).tolist()
            assert theirs(text)["input_ids"] == ids, (cls.__name__, text)
            assert theirs.decode(ids) == text


def test_saved_bpe_reads_back_with_the_same_ids(tmp_path):
    ours = train_bpe(TEXT, 300)
    ours.save(str(tmp_path))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.vocab_size == 300
    for text in SAMPLES:
        assert loaded.encode(text).tolist() == ours.encode(text).tolist()


def test_a_gpt2_tokenizer_directory_gives_transformers_ids(tmp_path):
    transformers = pytest.importorskip("transformers", reason="comparing needs transformers")
    directory = gpt2_tokenizer_directory(tmp_path / "gpt2-tokenizer")
    ours = make_tokenizer(directory, "unused: a directory is not trained")
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    assert ours.vocab_size == len(theirs)
    for text in SAMPLES:
        assert ours.encode(text).tolist() == theirs(text)["input_ids"]
    # Saved into a run directory, it keeps its transformers configuration (class, special tokens).
    ours.save(str(tmp_path / "run"))
    again = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "run"))
    assert type(again) is type(theirs) and again.eos_token == END_OF_TEXT
    assert again(TEXT[:200])["input_ids"] == theirs(TEXT[:200])["input_ids"]


def test_any_other_hugging_face_tokenizer_keeps_its_own_ids(tmp_path):
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"to": 0, "be": 1, "?": 2},
                                                             unk_token="?"))
    other.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.vocab_size == 3 and loaded.encode("to be or").tolist() == [0, 1, 2]


def test_a_directory_without_a_usable_tokenizer_json_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer file"):
        make_tokenizer(str(tmp_path), TEXT)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="tokenizer.json is not a Hugging Face tokenizer"):
        make_tokenizer(str(tmp_path), TEXT)


# ------------------------------------------------------------------ the CLI


@pytest.mark.timeout(120)
def test_train_with_bpe_resumes_and_generates(corpus, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, "--tokenizer", "bpe", "--vocab-size", 300,
                     *TINY_FLAGS, "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert GPT.from_pretrained(str(out)).config.vocab_size == 300  # from the tokenizer
    assert load_tokenizer(str(out)).encode(TEXT[:80]).tolist() == \
        train_bpe(TEXT, 300).encode(TEXT[:80]).tolist()
    result = run_cli("train", "--resume", "--data", corpus, *TINY_FLAGS, "--steps", 3,
                     "--out", out)
    assert result.exit_code == 0, result.output
    result = run_cli("generate", "--checkpoint", out, "--prompt", "3 little", "--max-new-tokens", 5)
    assert result.exit_code == 0 and result.output.startswith("3 little"), result.output
    result = run_cli("train", "--resume", "--data", corpus, "--vocab-size", 400, *TINY_FLAGS,
                     "--steps", 4, "--out", out)
    assert result.exit_code != 0 and "--vocab-size: 400 differs from the checkpoint's 300" \
        in result.output, result.output


@pytest.mark.timeout(120)
def test_train_with_a_hugging_face_tokenizer_directory_resumes_and_generates(corpus, tmp_path):
    directory = gpt2_tokenizer_directory(tmp_path / "gpt2-tokenizer", vocab_size=280)
    out = tmp_path / "run"
    result = run_cli("train", "--data", corpus, "--tokenizer", directory, *TINY_FLAGS,
                     "--steps", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert GPT.from_pretrained(str(out)).config.vocab_size == 280
    result = run_cli("train", "--resume", "--data", corpus, *TINY_FLAGS, "--steps", 3,
                     "--out", out)
    assert result.exit_code == 0, result.output
    result = run_cli("generate", "--checkpoint", out, "--prompt", "3 little", "--max-new-tokens", 5)
    assert result.exit_code == 0 and result.output.startswith("3 little"), result.output


@pytest.mark.timeout(120)
def test_an_earlier_run_directory_serves_as_a_tokenizer_directory(corpus, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli("train", "--data", corpus, *TINY_FLAGS, "--steps", 1, "--out", first) \
        .exit_code == 0
    result = run_cli("train", "--data", corpus, "--tokenizer", first, *TINY_FLAGS, "--steps", 1,
                     "--out", second)
    assert result.exit_code == 0, result.output
    result = run_cli("train", "--resume", "--data", corpus, *TINY_FLAGS, "--steps", 2,
                     "--out", second)
    assert result.exit_code == 0, result.output
    assert load_tokenizer(str(second)).chars == load_tokenizer(str(first)).chars


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer", "bpe"], "tokenizer 'bpe' needs a vocabulary size (--vocab-size)"),
    (["--vocab-size", "300"], "(--vocab-size 300) applies to tokenizer 'bpe' only, not 'char'"),
    (["--tokenizer", "no-such-dir"], "--tokenizer: 'no-such-dir' is neither char, byte, bpe nor"),
    (["--tokenizer", "bpe", "--vocab-size", "100"], "BPE vocabulary size 100 must be between 257"),
])
def test_tokenizer_flag_errors_are_one_line(corpus, tmp_path, flags, message):
    result = run_cli("train", "--data", corpus, *flags, *TINY_FLAGS, "--steps", 1,
                     "--out", tmp_path / "run")
    assert result.exit_code != 0
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


# ------------------------------------------------------------------ special tokens

BERT_ROLES = {"mask_token": "[MASK]", "pad_token": "[PAD]", "sep_token": "[SEP]",
              "cls_token": "[CLS]"}
SENTINELS = [f"<extra_id_{i}>" for i in range(3)]


def base_tokenizer(kind):
    return train_bpe(TEXT, 300) if kind == "bpe" else make_tokenizer(kind, TEXT + "[]")


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_special_tokens_join_every_tokenizer_after_its_vocabulary(kind):
    base = base_tokenizer(kind)
    extended = with_special_tokens(base, BERT_ROLES, SENTINELS)
    n = base.vocab_size
    assert extended.vocab_size == n + 7
    assert [extended.token_id(t) for t in [*BERT_ROLES.values(), *SENTINELS]] == \
        list(range(n, n + 7))
    text = TEXT[:200]
    assert extended.encode(text).tolist() == base.encode(text).tolist()  # every old id stays
    ids = extended.encode("3 little[MASK] pigs<extra_id_1>").tolist()
    assert ids == [*base.encode("3 little").tolist(), n, *base.encode(" pigs").tolist(), n + 5]
    assert extended.decode(ids) == "3 little[MASK] pigs<extra_id_1>"


def test_a_special_token_the_vocabulary_already_has_keeps_its_id():
    base = train_bpe(TEXT, 300)
    extended = with_special_tokens(base, {"eos_token": END_OF_TEXT, "pad_token": "[PAD]"})
    assert extended.token_id(END_OF_TEXT) == 0 and extended.token_id("[PAD]") == 300
    assert with_special_tokens(extended, {"pad_token": "[PAD]"}).vocab_size == 301


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_special_tokens_load_in_transformers_with_their_roles_and_ids(tmp_path, kind):
    transformers = pytest.importorskip("transformers", reason="comparing needs transformers")
    extended = with_special_tokens(base_tokenizer(kind), BERT_ROLES, SENTINELS)
    extended.save(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(theirs) == extended.vocab_size
    assert theirs.mask_token_id == extended.token_id("[MASK]")
    assert theirs.pad_token == "[PAD]" and theirs.sep_token == "[SEP]"
    text = "[CLS] 3 little pigs [MASK] came<extra_id_2> home.[SEP]"
    assert theirs(text)["input_ids"] == extended.encode(text).tolist()
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode(text).tolist() == extended.encode(text).tolist()
