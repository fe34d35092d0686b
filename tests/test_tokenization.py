"""llama.cpp's tokenizer inside an exported GGUF gives exactly the HF tokenizer's ids."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")
from llama_cpp import Llama  # noqa: E402

TEXTS = [
    "Determine if the following passage is relevant to the query. Answer only with 'true' or 'false'.\n"
    "Query: who wrote it?\nPassage: x\n<think>",
    "<think>\nreasoning here\n</think> true",
    "</think> false", "</think>true", "\n</think>\n\n false",
    "naïve café — Ünïcödé façade, Ελληνικά, русский текст, עברית, العربية",
    "東京都の人口は約1400万人です。中文分词测试：我们在北京。한국어 텍스트",
    "emoji 😀👍🏽🇫🇷 and ZWJ 👨‍👩‍👧‍👦",
    "digits 1234567890 3.14159 1,000,000 0x1F 2024-11-23 12:30:45",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\tif x != None: pass",
    "runs   of    spaces\n\n\n\nand\r\nnewlines \n \n",
    "   leading spaces", "trailing spaces   ", "'s 're 've 'll 'd 'm 't ALL CAPS'S",
    # HF tokenizers (and so vLLM, the official engine) parse special-token text as the token itself
    "<|endoftext|> and <|im_start|> inside a passage",
    "",
]


@pytest.mark.parametrize("name", ["qwen2-tied", "llama3", "mistral", "behaving-think"])
def test_gguf_tokenizer_matches_hf(name, fixture_dir, exported):
    hf = transformers.AutoTokenizer.from_pretrained(fixture_dir(name))
    llm = Llama(model_path=str(exported(name, "Q8_0")), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            want = hf.encode(text, add_special_tokens=True)
            got = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            assert got == want, repr(text)
            assert llm.detokenize(got, special=True).decode("utf-8") == hf.decode(want, skip_special_tokens=False)
    finally:
        llm.close()


def test_rank1_think_tokens_are_single_control_tokens(fixture_dir, exported):
    """rank1's tokenizer: <think> and </think> are added special tokens 151665/151666; the GGUF marks them CONTROL,
    the prompt's <think> is one token and the model's </think> renders as text."""
    import gguf

    hf = transformers.AutoTokenizer.from_pretrained(fixture_dir("behaving-think"))
    assert hf.convert_tokens_to_ids(["<think>", "</think>"]) == [151665, 151666]
    assert hf.encode("x\n<think>")[-1] == 151665 and hf.encode("</think> true") == [151666, 830]
    path = exported("behaving-think", "Q8_0")
    types = gguf.GGUFReader(path).fields["tokenizer.ggml.token_type"].contents()
    assert types[151665] == types[151666] == gguf.TokenType.CONTROL
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(b"</think> true", add_bos=True, special=True) == [151666, 830]
        assert llm.detokenize([151666], special=True) == b"</think>"
    finally:
        llm.close()
