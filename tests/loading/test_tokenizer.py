"""The Gemma tokenizer: special and stop tokens from the family, the chat format, refusals."""

import pytest

from gemma_export.errors import CheckpointError
from gemma_export.loading import Tokenizer, tokenizer_for
from helpers import small_tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(tokenizer_for("preset", None))


def test_special_and_stop_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert set(tok.stop_ids) == {tok.eos_id, tok.end_of_turn_id}
    assert tok.vocab_size == 262_144


def test_encode_adds_bos_and_chat_wraps_one_turn(tok):
    ids = tok.encode("The capital of France is")
    assert ids[0] == tok.bos_id and tok.encode("The capital of France is", bos=False) == ids[1:]
    chat = tok.chat("Hi")
    assert chat[:2] == [tok.bos_id, tok.start_of_turn_id]
    assert tok.decode(chat) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_not_a_gemma_tokenizer_is_refused(tmp_path):
    small_tokenizer(tmp_path / "tokenizer.json", specials=("[PAD]", "[CLS]"))
    with pytest.raises(CheckpointError, match="tokenizer has no <bos> token; not a Gemma tokenizer"):
        Tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(CheckpointError, match="not a valid tokenizer.json"):
        Tokenizer(tmp_path / "broken.json")
    with pytest.raises(CheckpointError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "missing.json")
