"""A thin layer over the `tokenizers` library: load, train, save, chat templates.

Reads what Hugging Face model dirs hold: tokenizer.json, or GPT-2's vocab.json + merges.txt, plus
tokenizer_config.json (special tokens, chat template) and chat_template.jinja. Writes tokenizer.json +
tokenizer_config.json, which transformers' AutoTokenizer opens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from gptlab.errors import GptlabError

EOS = "<|endoftext|>"


class Tokenizer:
    def __init__(self, backend, config: dict[str, Any] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend  # a tokenizers.Tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template")
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.pad_token = _token_str(self.config.get("pad_token"))
        if self.eos_token is None and backend.token_to_id(EOS) is not None:
            self.eos_token = EOS  # GPT-2 style vocabularies without a tokenizer_config.json

    # ---- ids ----
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def bos_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def pad_id(self) -> int | None:
        return self.token_id(self.pad_token)

    # ---- text <-> ids ----
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text (e.g. <|im_start|>) map to their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ----
    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the tokenizer's Jinja chat template (tokenizer_config.json's chat_template)."""
        if not self.chat_template:
            raise GptlabError("this tokenizer has no chat template (tokenizer_config.json 'chat_template')")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise GptlabError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        try:
            template = env.from_string(self.chat_template)
            return template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, eos_token=self.eos_token or "",
                bos_token=self.bos_token or "", **kwargs,
            )
        except TemplateError as e:
            raise GptlabError(f"chat template failed to render: {e}") from None

    # ---- files ----
    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(path / "tokenizer.json"))
        cfg = {k: v for k, v in self.config.items() if k not in ("chat_template", "added_tokens_decoder")}
        cfg.update(tokenizer_class="PreTrainedTokenizerFast", eos_token=self.eos_token, bos_token=self.bos_token,
                   pad_token=self.pad_token, model_max_length=cfg.get("model_max_length", 1024))
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def _token_str(tok: Any) -> str | None:
    if isinstance(tok, dict):  # {"content": "<|endoftext|>", ...} in older tokenizer_config.json files
        return tok.get("content")
    return tok


def load_tokenizer(path_or_id: str | os.PathLike) -> Tokenizer:
    """Load from an HF-format dir (tokenizer.json or vocab.json + merges.txt) or a hub id."""
    from tokenizers import Tokenizer as Backend

    from gptlab.formats.files import read_json
    from gptlab.formats.hf import resolve

    path = resolve(path_or_id)
    cfg: dict[str, Any] = {}
    cfg_file = path / "tokenizer_config.json"
    if cfg_file.is_file():
        cfg = read_json(cfg_file)
    template = None
    if (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text(encoding="utf-8")
    try:
        if (path / "tokenizer.json").is_file():
            backend = Backend.from_file(str(path / "tokenizer.json"))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            backend = _byte_level_from_files(path / "vocab.json", path / "merges.txt")
        else:
            raise GptlabError(f"{path} has no tokenizer (tokenizer.json, or vocab.json + merges.txt)")
    except GptlabError:
        raise
    except Exception as e:  # the tokenizers library raises plain Exception for malformed files
        raise GptlabError(f"could not read the tokenizer in {path}: {e}") from None
    return Tokenizer(backend, cfg, template)


def _byte_level_from_files(vocab: Path, merges: Path):
    """GPT-2's original tokenizer files: byte-level BPE, no prefix space, <|endoftext|> special."""
    from tokenizers import AddedToken, Tokenizer as Backend, decoders, models, pre_tokenizers

    backend = Backend(models.BPE.from_file(str(vocab), str(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    if backend.token_to_id(EOS) is not None:
        backend.add_special_tokens([AddedToken(EOS, special=True)])
    return backend


def train_tokenizer(
    texts: Iterable[str] | Iterator[str],
    vocab_size: int,
    special_tokens: list[str] | None = None,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE (GPT-2's scheme: any UTF-8 round-trips, Chinese included)."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers

    special_tokens = special_tokens or [EOS]
    if vocab_size < 256 + len(special_tokens):
        raise GptlabError(f"vocab_size must be at least {256 + len(special_tokens)} (256 bytes + special tokens)")
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, {"eos_token": special_tokens[0], "bos_token": special_tokens[0]})
