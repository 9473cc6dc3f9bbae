"""Text <-> token ids: a `tokenizers` backend with its special tokens, stop ids and chat template,
loaded from an HF checkpoint directory or from a GGUF file's metadata, and saved back as HF files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as Backend

from models.errors import CheckpointError
from models.llama4.chat_template import render_chat
from models.llama4.gguf_vocab import byte_level_backend, gguf_tokenizer_metadata, sentencepiece_backend

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


class Tokenizer:
    """Encode, decode and chat-template rendering with transformers' semantics (the reference the
    tests hold it to), without depending on transformers."""

    def __init__(self, backend: Backend, *, special_tokens: dict[str, str | None],
                 chat_templates: dict[str, str], stop_token_ids: Iterable[int],
                 add_bos_token: bool | None = None, add_eos_token: bool | None = None,
                 extra_config: dict[str, Any] | None = None, source: str = "tokenizer") -> None:
        # Serving must never cut a prompt short silently; limits are enforced (and reported) upstream.
        backend.no_truncation()
        backend.no_padding()
        self._backend = backend
        self._special = {k: v for k, v in special_tokens.items() if v is not None}
        self._source = source
        self._extra_config = dict(extra_config or {})
        self._add_bos, self._add_eos = add_bos_token, add_eos_token
        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self.chat_templates = dict(chat_templates)
        self.vocab_size: int = max(backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        self.bos_token_id = self._id_of("bos_token")
        self.eos_token_id = self._id_of("eos_token")
        self.pad_token_id = self._id_of("pad_token")
        self.unk_token_id = self._id_of("unk_token")
        stops = {int(i) for i in stop_token_ids}
        if self.eos_token_id is not None:
            stops.add(self.eos_token_id)
        if bad := sorted(i for i in stops if not 0 <= i < self.vocab_size):
            raise CheckpointError(f"{source}: stop token id {bad[0]} is outside the vocabulary "
                                  f"(size {self.vocab_size})")
        self.stop_token_ids: frozenset[int] = frozenset(stops)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # ---- loading ---------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """An HF checkpoint directory: tokenizer.json (required) and whatever of tokenizer_config.json,
        chat_template.jinja / .json, generation_config.json and config.json it has."""
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"{root}: no tokenizer.json (herd needs the fast-tokenizer file; "
                                  "a sentencepiece tokenizer.model alone is not supported)")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise CheckpointError(f"{tok_file}: cannot be read: {e}") from None
        cfg_file = root / "tokenizer_config.json"
        cfg = _read_json(cfg_file) or {}
        special = {name: _token_content(cfg.get(name), cfg_file, name) for name in _SPECIAL_NAMES}
        added: list[AddedToken] = []
        for key, spec in (cfg.get("added_tokens_decoder") or {}).items():
            if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
                raise CheckpointError(f"{cfg_file}: added_tokens_decoder[{key!r}] has no string 'content'")
            added.append(AddedToken(
                spec["content"], single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", True),
                special=spec.get("special", False)))
        extras = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
        extras = list(extras.values()) if isinstance(extras, dict) else list(extras)
        named = [*special.values(), *(_token_content(e, cfg_file, "extra_special_tokens") for e in extras)]
        # As transformers does: tokens the config names but tokenizer.json lacks are added, the
        # named ones as special, so that they are matched whole and skipped when decoding.
        present = {t.content for t in backend.get_added_tokens_decoder().values()}
        backend.add_tokens([t for t in added if t.content not in present and not t.special])
        backend.add_special_tokens([t for t in added if t.content not in present and t.special])
        _register_special(backend, named)
        templates = _templates_from_dir(root, cfg, cfg_file)
        stops: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            data = _read_json(root / name) or {}
            for where, section in (("", data), ("text_config.", data.get("text_config") or {})):
                stops |= _id_list(section.get("eos_token_id"), root / name, where + "eos_token_id")
        # add_bos_token / add_eos_token in the config are ignored: when tokenizer.json exists its
        # post-processor decides, as in transformers 5 (which drops those keys on load and save).
        kept = {k: v for k, v in cfg.items() if k not in _OWN_KEYS}
        return cls(backend, special_tokens=special, chat_templates=templates, stop_token_ids=stops,
                   extra_config=kept, source=str(root))

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer a llama.cpp GGUF describes in its tokenizer.* metadata, tokenizing as
        llama.cpp does (its pre-tokenizer table, token types and BOS/EOS defaults)."""
        path = Path(path)
        meta = gguf_tokenizer_metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise CheckpointError(f"{path}: no tokenizer.ggml.model / tokenizer.ggml.tokens; "
                                  "this GGUF carries no tokenizer")
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries "
                                  f"for {len(tokens)} tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if kind == "gpt2":
            backend, add_bos = byte_level_backend(path, tokens, types, merges,
                                                   meta.get("tokenizer.ggml.pre", "default"))
        elif kind == "llama":
            if meta.get("tokenizer.ggml.remove_extra_whitespaces"):
                raise CheckpointError(f"{path}: tokenizer.ggml.remove_extra_whitespaces is not supported")
            backend = sentencepiece_backend(path, tokens, types, meta.get("tokenizer.ggml.scores"), merges,
                                             bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
            add_bos = True
        else:
            raise CheckpointError(f"{path}: tokenizer.ggml.model {kind!r} is not supported "
                                  "(supported: 'gpt2' byte-level BPE, 'llama' sentencepiece)")

        def token(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            if token_id is None:
                return None
            if not 0 <= token_id < len(tokens):
                raise CheckpointError(f"{path}: tokenizer.ggml.{key} = {token_id} is outside the vocabulary")
            return backend.id_to_token(int(token_id))

        special = {"bos_token": token("bos_token_id"), "eos_token": token("eos_token_id"),
                   "unk_token": token("unknown_token_id"), "pad_token": token("padding_token_id")}
        _register_special(backend, special.values())
        stops = {backend.token_to_id(t) for t in (token("eot_token_id"), token("eom_token_id")) if t}
        templates = {}
        if isinstance(meta.get("tokenizer.chat_template"), str):
            templates["default"] = meta["tokenizer.chat_template"]
        for name in meta.get("tokenizer.chat_templates") or []:
            if isinstance(meta.get(f"tokenizer.chat_template.{name}"), str):
                templates[name] = meta[f"tokenizer.chat_template.{name}"]
        return cls(backend, special_tokens=special, chat_templates=templates, stop_token_ids=stops,
                   add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos)),
                   add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)), source=str(path))

    # ---- ids and text ----------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos if self._add_bos is not None else bool(self.encode("", True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Special-token strings in `text` (e.g. "<|im_start|>") become their ids, as in transformers."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Ids past the tokenizer's vocabulary (models pad their embedding tables) have no text."""
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str:
        """The raw vocabulary piece (e.g. 'Ġworld'), as logprobs show it."""
        piece = self._backend.id_to_token(token_id) if token_id >= 0 else None
        return "" if piece is None else piece  # a padding id past the tokenizer's vocabulary

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        return self.token_to_str(ids) if isinstance(ids, int) else [self.token_to_str(i) for i in ids]

    def backend_json(self) -> str:
        """The `tokenizers` JSON of this tokenizer (what grammar engines build their vocabulary from)."""
        return self._backend.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # ---- chat --------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **extra: Any) -> str:
        """The prompt text, rendered like transformers' apply_chat_template(tokenize=False)."""
        name = "tool_use" if tools is not None and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(name)
        if source is None:
            raise CheckpointError(f"{self._source}: the model has no chat template; "
                                  "use the completions endpoint or pass a template")
        return render_chat(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                           special_tokens=self._special, name=f"{self._source}: chat template", **extra)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **extra: Any) -> list[int]:
        # The template writes bos_token itself; adding special tokens again would double the BOS.
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                        **extra)
        return self.encode(text, add_special_tokens=False)

    # ---- saving ------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> None:
        """tokenizer.json + tokenizer_config.json that from_dir and transformers' AutoTokenizer read
        back to the same ids and template. Whether BOS/EOS are added is in tokenizer.json's
        post-processor. Stop ids beyond eos live in generation_config.json / config.json, which
        belong to the model export, not here."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(out / "tokenizer.json"))
        # The generic class makes transformers use tokenizer.json as is; a model-specific class
        # (LlamaTokenizer, ...) would rebuild its own pre-tokenizer around the vocabulary.
        cfg: dict[str, Any] = {**self._extra_config, "tokenizer_class": "PreTrainedTokenizerFast",
                               "clean_up_tokenization_spaces": False, **self._special}
        if len(self.chat_templates) == 1 and "default" in self.chat_templates:
            cfg["chat_template"] = self.chat_templates["default"]
        elif self.chat_templates:
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_templates.items()]
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    # ---- helpers -----------------------------------------------------------------------------------

    def _id_of(self, name: str) -> int | None:
        content = self._special.get(name)
        if content is None:
            return None
        token_id = self._backend.token_to_id(content)
        if token_id is None:
            raise CheckpointError(f"{self._source}: {name} {content!r} is not in the vocabulary")
        return token_id

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        """BOS/EOS added by encode(add_special_tokens=True), as transformers' update_post_processor."""
        ends: dict[str, tuple[str, int]] = {}
        for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
            content = self._special.get(name)
            if flag and content is None:
                raise CheckpointError(f"{self._source}: add_{name} is true but {name} is not set")
            if flag:
                ends[name] = (content, self._id_of(name))

        def template(seq: str, type_id: int) -> list[str]:
            bos = [f"{ends['bos_token'][0]}:{type_id}"] if "bos_token" in ends else []
            eos = [f"{ends['eos_token'][0]}:{type_id}"] if "eos_token" in ends else []
            return [*bos, f"${seq}:{type_id}", *eos]

        self._backend.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=template("A", 0) + template("B", 1),
            special_tokens=list(ends.values()))


# tokenizer_config.json keys that save() writes itself, or drops because they would make
# transformers load something other than tokenizer.json (remote code, another file).
_OWN_KEYS = {"tokenizer_class", "clean_up_tokenization_spaces", "chat_template", "add_bos_token",
             "add_eos_token", "added_tokens_decoder", "auto_map", "tokenizer_file", "name_or_path",
             *_SPECIAL_NAMES}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, path: Path, field: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise CheckpointError(f"{path}: {field} must be a string or {{'content': ...}}, got {value!r}")


def _id_list(value: Any, path: Path, field: str) -> set[int]:
    if value is None:
        return set()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise CheckpointError(f"{path}: {field} must be an int or a list of ints, got {value!r}")
    return set(values)


def _templates_from_dir(root: Path, cfg: dict, cfg_file: Path) -> dict[str, str]:
    """Named chat templates; the newer file forms win over tokenizer_config.json, as in transformers."""
    templates: dict[str, str] = {}
    raw = cfg.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        for i, entry in enumerate(raw):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise CheckpointError(f"{cfg_file}: chat_template[{i}] needs string 'name' and 'template'")
            templates[entry["name"]] = entry["template"]
    elif raw is not None:
        raise CheckpointError(f"{cfg_file}: chat_template must be a string or a list of named templates")
    processor = _read_json(root / "chat_template.json")
    if processor is not None:
        if not isinstance(processor.get("chat_template"), str):
            raise CheckpointError(f"{root / 'chat_template.json'}: no string 'chat_template'")
        templates["default"] = processor["chat_template"]
    jinja = root / "chat_template.jinja"
    if jinja.is_file():
        templates["default"] = jinja.read_text(encoding="utf-8")
    extra_dir = root / "additional_chat_templates"
    if extra_dir.is_dir():
        for file in sorted(extra_dir.glob("*.jinja")):
            templates[file.stem] = file.read_text(encoding="utf-8")
    return templates


def _register_special(backend: Backend, contents: Iterable[str | None]) -> None:
    """Named special tokens that are not yet added tokens become special ones, as transformers
    does on load, so that they are matched whole in text and skipped when decoding."""
    present = {t.content for t in backend.get_added_tokens_decoder().values()}
    backend.add_special_tokens([AddedToken(c, special=True, normalized=False)
                                for c in dict.fromkeys(contents) if c is not None and c not in present])


# ---- GGUF vocabularies ---------------------------------------------------------------------------


