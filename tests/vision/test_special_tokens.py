"""MobiLlama-V with a SmolLM2-style (ChatML) tokenizer: prompts and training rows get no BOS in front (the
template's <|im_start|> is the only one), captions end at EOS, and generation stops at any stop id."""

from __future__ import annotations

import pytest
import torch

from mobillama.sft.masking import IGNORE_INDEX
from mobillama.vision.chat import image_prompt_ids
from mobillama.vision.config import IMAGE_TOKEN_ID
from mobillama.vision.data import caption_example, conversation_example

IM_START, IM_END, END_OF_TEXT = 1, 2, 0


@pytest.fixture(scope="module")
def smol_hf(smol_tokenizer_dir):
    """The transformers tokenizer, loaded the way the vision code loads a checkpoint's (AutoTokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_tokenizer_dir), local_files_only=True)


def test_image_prompt_has_one_im_start_in_front(smol_hf):
    ids = image_prompt_ids(smol_hf, [{"role": "user", "content": "what is it?"}], 1)
    assert ids[0] == IM_START and ids[1] != IM_START and ids.count(IMAGE_TOKEN_ID) == 1
    assert ids.count(IM_START) == 3  # system, user, assistant: one per turn


def test_project_tokenizer_prompt_keeps_its_bos(tokenizer):
    ids = image_prompt_ids(tokenizer, [{"role": "user", "content": "what is it?"}], 1)
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1


def test_training_rows_have_no_doubled_bos(smol_hf, tmp_path):
    caption = caption_example(smol_hf, "c", tmp_path / "x.png", "a red circle", 64)
    assert caption.input_ids[0] == IMAGE_TOKEN_ID and caption.input_ids[-1] == IM_END  # no BOS for text
    conversation = [
        {"role": "user", "content": "<image>\nWhat is in the picture?"},
        {"role": "assistant", "content": "a red circle"},
    ]
    row = conversation_example(smol_hf, "r", conversation, [tmp_path / "x.png"], 128)
    assert row.input_ids[0] == IM_START and row.input_ids[1] != IM_START and row.labels[0] == IGNORE_INDEX
    labelled = smol_hf.decode([t for t in row.labels if t != IGNORE_INDEX])
    assert labelled == "a red circle<|im_end|>\n"


def test_generate_stops_at_any_of_several_stop_ids(tiny_model):
    with torch.no_grad():  # every logit equal: greedy picks id 0 (<|endoftext|> in a SmolLM2 vocabulary)
        tiny_model.decoder.lm_head.weight.zero_()
    ids = torch.tensor([[1, IMAGE_TOKEN_ID, 7, 8]])
    pixels = torch.randn(1, 3, 32, 32)
    assert tiny_model.generate(ids, pixels, max_new_tokens=5, eos_id=[IM_END, END_OF_TEXT])[0] == [0]
    assert tiny_model.generate(ids, pixels, max_new_tokens=5, eos_id=IM_END)[0] == [0] * 5
