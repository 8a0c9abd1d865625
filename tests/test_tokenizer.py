"""The BPE tokenizer against OpenAI's own (loaded from the installed clip-anytorch files)."""
import importlib.util

import pytest
import torch

from model.tokenizer import CLASS_ID, Tokenizer, default_vocab_path


@pytest.fixture(scope="module")
def openai_tokenizer():
    """OpenAI's SimpleTokenizer, imported from its file alone (the `clip` package's __init__
    needs pkg_resources, which new environments lack)."""
    path = default_vocab_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(default_vocab_path()))


TEXTS = ["a photo of a good bottle", "a photo of a damaged metal_nut", "A PCB, with 2 scratches!",
         "it's   the    candle's  crack &amp; hole", "naïve café — ünïcode ✓", "pipe_fryum 1234",
         "", "zipper, leather; wood... tile:grid"]


@pytest.mark.parametrize("text", TEXTS)
def test_matches_openai(openai_tokenizer, text):
    assert Tokenizer().encode(text) == openai_tokenizer.encode(text)


def test_vocabulary_size_and_specials():
    tok = Tokenizer()
    assert len(tok.encoder) == 49409
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407


def test_class_token_is_kept_whole():
    tok = Tokenizer()
    ids = tok.tokenize(["a photo of a damaged <|class|>"])[0]
    body = tok.encode("a photo of a damaged")
    assert ids[:len(body) + 3].tolist() == [49406, *body, CLASS_ID, 49407]
    assert ids.shape == (77,) and ids.dtype == torch.long and not ids[len(body) + 3:].any()


def test_too_long_text_is_an_error():
    with pytest.raises(ValueError, match="longer than the context length 77"):
        Tokenizer().tokenize(["word " * 80])
