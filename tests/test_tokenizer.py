import pytest

from speedec.errors import TokenizerError
from speedec.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\n\nnewlines ", "Ünïcödé — “quotes” 日本語 🙂", ""]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    with pytest.raises(TokenizerError):
        tok.decode([300])


def test_bpe_round_trip_and_eos(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(("the quick brown fox jumps over the lazy dog. " * 50 + "\n") * 20 + "".join(TEXTS))
    tok = train_bpe([corpus], tmp_path / "m" / "tokenizer.json", vocab_size=300)
    assert tok.vocab_size <= 300 and tok.eos_token_id is not None
    for text in TEXTS + ["the quick brown fox"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    loaded = load_tokenizer(tmp_path / "m", vocab_size=300)
    assert loaded.encode("lazy dog") == tok.encode("lazy dog")
    with pytest.raises(TokenizerError, match="only 100"):
        load_tokenizer(tmp_path / "m", vocab_size=100)


def test_fallbacks_and_errors(tmp_path):
    assert isinstance(load_tokenizer(tmp_path, vocab_size=256), ByteTokenizer)
    with pytest.raises(TokenizerError, match="too small"):
        load_tokenizer(tmp_path, vocab_size=40)
    with pytest.raises(TokenizerError, match="does not exist"):
        train_bpe([tmp_path / "none.txt"], tmp_path / "t.json")
    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(tmp_path, vocab_size=1000)
