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


def _domain_corpus():
    lines = []
    for step in range(40):
        lines.append(f"Step {step}: you see a tree 3 steps to your north-west; inventory wood {step % 5}")
        lines.append(f"<|APPEND|>actions_log.txt|Step {step} action 'Move North': no change<|END|>")
        lines.append("<|READ|>strategy.txt<|END|>\n<|TAIL|>actions_log.txt|3<|END|>\n<|DONE|>")
    return lines


def test_domain_tokenizer_keeps_template_specials_and_encodes_any_text(tmp_path):
    from automem_jax.models.tokenizer import train_domain_tokenizer
    base = load_tokenizer()
    tok = train_domain_tokenizer(_domain_corpus(), base, 600)
    assert 256 < len(tok) <= 600
    assert (tok.eos_token, tok.pad_token) == (base.eos_token, base.pad_token)
    # Frequent op tags are whole tokens; the chat template renders exactly as the base one.
    assert tok.convert_ids_to_tokens(tok("<|APPEND|>x<|END|>")["input_ids"])[0] == "<|APPEND|>"
    msgs = [{"role": "user", "content": "Observe the tree."}, {"role": "assistant", "content": "<|DONE|>"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == base.apply_chat_template(msgs, tokenize=False)
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert len(again) == len(tok)
    # Text never seen in training (prompts reworded by Loop 1, unicode) still round-trips via bytes.
    for text in ("Zombies approach — flee eastward! 🧟", "<|COUNT|>map.txt|diamond<|END|>"):
        assert again.decode(again(text)["input_ids"]) == text
    ids = apply_chat_template(again, msgs, add_generation_prompt=False)
    assert ids.count(again.convert_tokens_to_ids("<|im_end|>")) == 2
    assert max(ids) < len(again)


def test_domain_tokenizer_rejects_bad_input():
    from automem_jax.models.tokenizer import train_domain_tokenizer
    base = load_tokenizer()
    with pytest.raises(ValueError, match="no text"):
        train_domain_tokenizer(["", ""], base, 1000)
    with pytest.raises(ValueError, match="too small"):
        train_domain_tokenizer(_domain_corpus(), base, 100)
