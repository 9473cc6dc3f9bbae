"""The real default model (SmolLM2-135M-Instruct GGUF): greedy chat continuations equal transformers'."""

from __future__ import annotations

import pytest
import torch

from models.default import default_model_path
from models.llama4.generate import generate_tokens

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in one sentence what a CPU does.",
]


@pytest.fixture(scope="module")
def ours(default_fp32):
    return default_fp32


@pytest.fixture(scope="module")
def reference():
    from transformers import LlamaForCausalLM

    path = default_model_path()
    return LlamaForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                            attn_implementation="eager").eval()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_chat_matches_transformers(ours, reference, prompt):
    tok = ours.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    with torch.inference_mode():
        out = reference.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=32, do_sample=False, eos_token_id=sorted(tok.stop_token_ids),
                                 pad_token_id=tok.pad_token_id)
    expected = out[0, len(ids):].tolist()
    got = list(generate_tokens(ours.model, ids, 32, stop_ids=tok.stop_token_ids))
    assert got == expected, (tok.decode(got), tok.decode(expected))
    assert len(got) >= 5


def test_answers_the_capital_question(ours):
    tok = ours.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": PROMPTS[0]}], add_generation_prompt=True)
    text = tok.decode(list(generate_tokens(ours.model, ids, 32, stop_ids=tok.stop_token_ids)))
    assert "Paris" in text
