"""A small byte-level BPE tokenizer the project trains itself on the demo corpus, for the tiny model.

The built-in model's 49,152-token vocabulary would make the output head most of a tiny model's
work on a CPU; 4,096 tokens learned from the same stdlib docstrings keep the demo fast. It has a
Llama 4 style chat template (header tokens, <|eot|> ends a turn) and is written as an HF tokenizer
directory, so the export carries it and `herd serve` and transformers read it like any other.
The same corpus gives the same tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from training.corpus import cache_dir, materialise, python_tag

NAME = "builtin:stdlib-bpe"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|pad|>", "<|header_start|>", "<|header_end|>", "<|eot|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|header_start|>{{ m['role'] }}<|header_end|>\n\n"
    "{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|header_start|>assistant<|header_end|>\n\n{% endif %}")


def train_bpe(out_dir: Path, corpus: Path, vocab_size: int = 4096) -> Path:
    """Trains on `corpus` (JSONL, field "text") and writes tokenizer.json, tokenizer_config.json and
    generation_config.json (whose eos ids make <|eot|> a stop token) into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)

    def texts():
        with corpus.open(encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|pad|>",
        "chat_template": CHAT_TEMPLATE}, indent=2))
    stops = [tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot|>")]
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}, indent=2))
    return out_dir


def materialise_tokenizer(name: str, cache: Path | None = None) -> Path:
    """`builtin:stdlib-bpe` as a tokenizer directory in the cache (trained once); other names as given."""
    if name != NAME:
        return Path(name)
    cache = cache or cache_dir()
    out = cache / f"{python_tag()}-stdlib-bpe"
    if not (out / "tokenizer.json").is_file():
        tmp = cache / f"{out.name}.{os.getpid()}.tmp"
        train_bpe(tmp, materialise("builtin:stdlib-docs", cache))
        try:
            tmp.rename(out)
        except OSError:  # a concurrent run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return out
