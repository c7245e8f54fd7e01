import numpy as np
import pytest

from ringpipe.model.data.dataset import TokenDataset, corpus_files, load_corpus, write_token_file
from ringpipe.model.data.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer, make_tokenizer

TEXT = "To be, or not to be: that is the question.\nWhether 'tis nobler in the mind to suffer\n" * 20


def test_char_tokenizer_vocabulary_is_sorted_distinct_characters():
    tokenizer = CharTokenizer.from_text("banana")
    assert tokenizer.chars == "abn"
    assert tokenizer.vocab_size == 3
    assert tokenizer.encode("nab").tolist() == [2, 0, 1]


@pytest.mark.parametrize("tokenizer", [CharTokenizer.from_text(TEXT + "é✓"), ByteTokenizer()])
def test_encode_then_decode_is_identity(tokenizer):
    text = TEXT[:200] + "é✓"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_char_tokenizer_names_the_unknown_character():
    with pytest.raises(ValueError, match=r"'z' at position 2"):
        CharTokenizer.from_text("abc").encode("abzc")


def test_byte_tokenizer_encodes_utf8_bytes():
    assert ByteTokenizer().encode("é").tolist() == [0xC3, 0xA9]
    assert ByteTokenizer().vocab_size == 256


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_saved_tokenizer_loads_back_equal(tmp_path, kind):
    tokenizer = make_tokenizer(kind, TEXT)
    tokenizer.save(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["special_tokens_map.json",
                                                           "tokenizer.json", "tokenizer_config.json"]
    loaded = load_tokenizer(str(tmp_path))
    assert type(loaded) is type(tokenizer) and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(TEXT).tolist() == tokenizer.encode(TEXT).tolist()


def test_load_tokenizer_rejects_missing_and_corrupt_files(tmp_path):
    with pytest.raises(ValueError, match="no tokenizer file"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt tokenizer file"):
        load_tokenizer(str(tmp_path))


def test_unknown_tokenizer_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown tokenizer 'words'"):
        make_tokenizer("words", TEXT)


def test_corpus_from_file_dir_and_glob_concatenates_sorted_files(tmp_path):
    (tmp_path / "b.txt").write_text("BBB")
    (tmp_path / "a.txt").write_text("AAA")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("CCC")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "index").write_bytes(b"\xff")
    assert load_corpus(str(tmp_path / "a.txt")) == "AAA"
    assert load_corpus(str(tmp_path)) == "AAABBBCCC"
    assert load_corpus(str(tmp_path / "*.txt")) == "AAABBB"


def test_corpus_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="no files matched"):
        corpus_files(str(tmp_path / "*.nothing"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(str(tmp_path / "empty.txt"))
    (tmp_path / "binary.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(str(tmp_path / "binary.bin"))


def test_default_corpus_is_capped_stdlib_python_source():
    text = load_corpus(None, max_chars=50_000)
    assert len(text) == 50_000
    assert "import" in text
    assert text == load_corpus(None, max_chars=50_000)


def _dataset(tmp_path, n=1000):
    ids = np.arange(n) % 50
    write_token_file(ids, str(tmp_path / "tokens.bin"))
    return TokenDataset.from_file(str(tmp_path / "tokens.bin"), val_fraction=0.1)


def test_token_file_split_is_90_10_and_memory_mapped(tmp_path):
    data = _dataset(tmp_path)
    assert isinstance(data.splits["train"], np.memmap)
    assert len(data.splits["train"]) == 900 and len(data.splits["val"]) == 100
    assert data.splits["val"][0] == 900 % 50


def test_batch_targets_are_inputs_shifted_by_one(tmp_path):
    data = _dataset(tmp_path)
    x, y = data.get_batch("train", step=3, batch_size=8, block_size=16, seed=0)
    assert x.shape == y.shape == (8, 16)
    assert np.array_equal(x[:, 1:], y[:, :-1])
    assert np.array_equal((x + 1) % 50, y)  # the stream counts up modulo 50


@pytest.mark.parametrize("sampler", ["epoch", "random"])
def test_batches_are_deterministic_per_seed_step_and_split(tmp_path, sampler):
    data = _dataset(tmp_path)
    a = data.get_batch("train", 5, 8, 16, seed=1, sampler=sampler)[0]
    assert np.array_equal(a, data.get_batch("train", 5, 8, 16, seed=1, sampler=sampler)[0])
    assert not np.array_equal(a, data.get_batch("train", 6, 8, 16, seed=1, sampler=sampler)[0])
    assert not np.array_equal(a, data.get_batch("train", 5, 8, 16, seed=2, sampler=sampler)[0])


def test_the_sampler_chooses_how_train_batches_walk_the_split(tmp_path):
    data = _dataset(tmp_path)
    epoch = data.get_batch("train", 0, 8, 16, seed=1, sampler="epoch")[0]
    random = data.get_batch("train", 0, 8, 16, seed=1, sampler="random")[0]
    assert not np.array_equal(epoch, random)
    assert np.array_equal(data.get_batch("val", 0, 8, 16, seed=1, sampler="epoch")[0],
                          data.get_batch("val", 0, 8, 16, seed=1, sampler="random")[0])
    with pytest.raises(ValueError, match="unknown sampler 'shuffle'"):
        data.get_batch("train", 0, 8, 16, seed=1, sampler="shuffle")


def test_a_train_epoch_visits_every_window_of_its_phase_exactly_once():
    data = TokenDataset(np.arange(1000) % 50, val_fraction=0.1)  # train: 900 tokens
    block = 16
    per_epoch = (900 - block - 1) // block  # one window given up to leave room for the phase
    phases = set()
    for epoch in range(4):
        starts = data.train_window_starts(epoch * per_epoch, per_epoch, block, seed=7)
        phase = int(starts.min())
        phases.add(phase)
        assert 0 <= phase < block
        assert sorted(starts) == [phase + k * block for k in range(per_epoch)]
        assert starts.max() + block + 1 <= 900
        assert not np.array_equal(starts, np.sort(starts))  # shuffled
    assert len(phases) > 1  # later epochs cut the text at other places


def test_train_samples_do_not_depend_on_how_they_are_batched():
    data = TokenDataset(np.arange(1000) % 50, val_fraction=0.1)
    whole = data.train_window_starts(0, 300, 16, seed=3)  # spans several epochs
    pieces = [data.train_window_starts(first, 12, 16, seed=3) for first in range(0, 300, 12)]
    assert np.array_equal(whole, np.concatenate(pieces))
    x, _ = data.get_batch("train", 2, 12, 16, seed=3)
    assert np.array_equal(x[:, 0], (whole[24:36]) % 50)


def test_train_windows_fit_a_split_barely_longer_than_a_block():
    data = TokenDataset(np.arange(20), val_fraction=0.5)  # train: 10 tokens
    for block in (9, 8, 5, 4):
        starts = data.train_window_starts(0, 40, block, seed=0)
        assert starts.min() >= 0 and starts.max() + block + 1 <= 10, block
    assert set(data.train_window_starts(0, 10, 9, seed=0)) == {0}


def test_val_batches_come_from_the_val_split(tmp_path):
    ids = np.concatenate([np.zeros(900), np.ones(100)])
    data = TokenDataset(ids, val_fraction=0.1)
    x, _ = data.get_batch("val", 0, 4, 8, seed=0)
    assert (x == 1).all()


def test_block_size_larger_than_the_data_is_rejected(tmp_path):
    data = _dataset(tmp_path, n=100)  # val split: 10 tokens
    with pytest.raises(ValueError, match="too small for block size 10: the val split has 10"):
        data.get_batch("train", 0, 2, 10, seed=0)
    data.get_batch("train", 0, 2, 9, seed=0)


def test_token_file_rejects_ids_beyond_uint16(tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        write_token_file(np.array([70000]), str(tmp_path / "t.bin"))
