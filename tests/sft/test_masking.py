"""Assistant-only label masks checked token by token against the rendered template."""

from __future__ import annotations

import pytest
import torch

from mobillama.sft.masking import IGNORE_INDEX, assistant_spans, collate, tokenize_conversation

SINGLE = [
    {"role": "user", "content": "What does json.dumps do?"},
    {"role": "assistant", "content": "Serialize obj to a JSON formatted str."},
]
MULTI = SINGLE + [
    {"role": "user", "content": "And json.loads?"},
    {"role": "assistant", "content": "Deserialize a str to a Python object."},
]


def labelled_text(tok, example):
    return tok.decode([t for t in example.labels if t != IGNORE_INDEX])


def test_single_turn_labels_exactly_the_reply_and_eos(chat_tokenizer):
    ex = tokenize_conversation(chat_tokenizer, SINGLE, max_length=512)
    assert ex.input_ids[0] == chat_tokenizer.bos_token_id and ex.labels[0] == IGNORE_INDEX
    assert labelled_text(chat_tokenizer, ex) == " Serialize obj to a JSON formatted str.</s>"
    # everything before the reply is masked: the unlabelled tokens decode to the prompt
    prompt = chat_tokenizer.decode(
        [t for t, lab in zip(ex.input_ids[1:], ex.labels[1:]) if lab == IGNORE_INDEX]
    )
    assert prompt.endswith("### Human: What does json.dumps do?\n### Assistant:")


def test_multi_turn_labels_every_assistant_turn_and_no_user_text(chat_tokenizer):
    ex = tokenize_conversation(chat_tokenizer, MULTI, max_length=512)
    text = labelled_text(chat_tokenizer, ex)
    assert text == " Serialize obj to a JSON formatted str.</s> Deserialize a str to a Python object.</s>"
    assert "Human" not in text and "json.loads" not in text


def test_spans_cover_the_rendered_replies(chat_tokenizer):
    text, spans = assistant_spans(chat_tokenizer, MULTI)
    assert [text[a:b] for a, b in spans] == [
        " Serialize obj to a JSON formatted str.</s>",
        " Deserialize a str to a Python object.</s>",
    ]


def test_truncation_never_ends_on_a_dangling_prompt(chat_tokenizer):
    full = tokenize_conversation(chat_tokenizer, MULTI, max_length=512)
    first_reply_end = full.input_ids.index(chat_tokenizer.eos_token_id)  # the </s> closing reply 1
    # cut inside the second user turn: the row must end at the first reply
    cut = first_reply_end + 4
    ex = tokenize_conversation(chat_tokenizer, MULTI, max_length=cut)
    assert len(ex.input_ids) == first_reply_end + 1
    assert ex.labels[-1] != IGNORE_INDEX
    assert ex.input_ids == full.input_ids[: first_reply_end + 1]


def test_truncation_inside_the_first_prompt_gives_no_example(chat_tokenizer):
    assert tokenize_conversation(chat_tokenizer, SINGLE, max_length=5) is None


def test_collate_padding_and_packing(chat_tokenizer):
    a = tokenize_conversation(chat_tokenizer, SINGLE, max_length=512)
    b = tokenize_conversation(chat_tokenizer, MULTI, max_length=512)
    padded = collate([a, b], pad_id=0)
    assert padded["input_ids"].shape == (2, len(b.input_ids))
    assert padded["attention_mask"][0].sum().item() == len(a.input_ids)
    assert (padded["labels"][0, len(a.input_ids) :] == IGNORE_INDEX).all()
    packed = collate([a, b, a], pad_id=0, pack_to=len(a.input_ids) + len(b.input_ids))
    assert packed["input_ids"].shape[0] == 2
    assert packed["segment_ids"][0].unique().tolist() == [0, 1]
    assert torch.equal(packed["input_ids"][0, : len(a.input_ids)], torch.tensor(a.input_ids))
    with pytest.raises(ValueError, match="does not fit"):
        collate([b], pad_id=0, pack_to=3)


def test_chatml_masks_have_one_im_start_in_front_and_label_the_im_end(smol_tokenizer_dir):
    """SmolLM2's conventions: the template starts with <|im_start|> (the BOS token) and the tokenizer adds
    no BOS to text, so nothing is put in front; each reply is labelled through its <|im_end|>."""
    from mobillama.tokenizer import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    ex = tokenize_conversation(tok, MULTI, max_length=512)
    assert ex.input_ids[0] == tok.bos_id == 1 and ex.input_ids[1] != 1 and ex.labels[0] == IGNORE_INDEX
    assert ex.input_ids == tok.encode(tok.apply_chat_template(MULTI, add_generation_prompt=False))
    assert labelled_text(tok.hf, ex) == (
        "Serialize obj to a JSON formatted str.<|im_end|>\nDeserialize a str to a Python object.<|im_end|>\n"
    )
    # the prompt up to the first reply is exactly what inference feeds the model (encode_prompt)
    prompt = tok.encode_prompt(tok.apply_chat_template(SINGLE[:1]))
    assert ex.input_ids[: len(prompt)] == prompt


def test_a_project_tokenizer_mask_has_one_bos_even_when_the_template_writes_it(project_tokenizer):
    tok, _ = project_tokenizer
    ex = tokenize_conversation(tok, SINGLE, max_length=512)
    assert ex.input_ids[0] == tok.bos_id and ex.input_ids.count(tok.bos_id) == 1
    original = tok.hf.chat_template
    try:
        tok.hf.chat_template = "{{ bos_token }}" + original
        ex = tokenize_conversation(tok, SINGLE, max_length=512)
        assert ex.input_ids[0] == tok.bos_id and ex.input_ids.count(tok.bos_id) == 1
    finally:
        tok.hf.chat_template = original


def test_a_template_that_raises_is_a_one_line_error(smol_tokenizer_dir):
    from mobillama.errors import MobiLlamaError
    from mobillama.tokenizer import load_tokenizer

    tok = load_tokenizer(smol_tokenizer_dir)
    tok.hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(MobiLlamaError, match="chat template failed to render these messages: roles must"):
        tokenize_conversation(tok, SINGLE, max_length=512)
