"""The offline Qwen3 tokenizer and its chat template."""

import pytest

from automem_jax.models.tokenizer import apply_chat_template, default_tokenizer_dir, load_tokenizer


def test_default_tokenizer_is_qwen3_with_chat_template():
    tok = load_tokenizer()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert len(tok) == 151669
    text = "SEARCH notes.md | wood"
    assert tok.decode(tok(text)["input_ids"]) == text
    msgs = [{"role": "system", "content": "You play Crafter."}, {"role": "user", "content": "Observe."}]
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nYou play Crafter.<|im_end|>\n<|im_start|>user\nObserve.")
    assert rendered.rstrip().endswith("<|im_start|>assistant")
    ids = apply_chat_template(tok, msgs)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == rendered


def test_missing_tokenizer_folder_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
    assert default_tokenizer_dir().endswith("tokenizer_files")
