"""Tokenizers: a trained byte-level BPE (``tokenizer.json``) or plain bytes.

Engines never see text; the CLI and evaluation use these to go between text
and ids. A model directory with a ``tokenizer.json`` uses it; one without
falls back to one token per UTF-8 byte (needs ``vocab_size >= 256``).

A Hugging Face checkpoint (an imported Ouro or Nanbeige model) also brings
``tokenizer_config.json`` (its chat template: :func:`chat_prompt`; whether a
prompt starts with the beginning-of-text token: ``add_bos_token``, see
:func:`prompt_ids`) and ``generation_config.json`` (its end-of-text token; see
:func:`stop_token_id`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import TokenizerError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
EOS_TOKEN = "<|endoftext|>"
# Where a ChatML turn ends: generation stops there when the tokenizer has it.
CHAT_END_TOKEN = "<|im_end|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """One token per UTF-8 byte; no special tokens."""

    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is not a byte (the byte tokenizer has 256 ids)")
        return bytes(ids).decode("utf-8", errors="replace")


class BPETokenizer:
    """A tokenizer of the ``tokenizers`` library (``tokenizer.json``): speedec's own
    byte-level BPE, or an imported checkpoint's."""

    # The token a prompt starts with (tokenizer_config.json's add_bos_token and
    # bos_token); None: prompts are encoded as they are. Set by load_tokenizer.
    bos_token_id: int | None = None
    # The model's vocabulary when it is larger than the tokenizer's (rows padded to a
    # round size, as in Nanbeige4.2: 166,144 rows for 166,107 tokens): ids in between
    # decode to no text. Set by load_tokenizer.
    model_vocab_size: int | None = None

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises a bare Exception on bad files
            raise TokenizerError(f"cannot load tokenizer {path}: {exc}") from None
        self.vocab_size = self._tok.get_vocab_size()
        self.eos_token_id = self._tok.token_to_id(EOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of many texts at once (the library spreads them over threads)."""
        return [enc.ids for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int]) -> str:
        limit = max(self.vocab_size, self.model_vocab_size or 0)
        bad = [i for i in ids if not 0 <= i < limit]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                                 f"(0..{limit - 1})")
        return self._tok.decode([i for i in ids if i < self.vocab_size], skip_special_tokens=False)


def load_tokenizer(model_dir: str | Path | None, vocab_size: int) -> Tokenizer:
    """The model's ``tokenizer.json`` if present, else bytes (checked against ``vocab_size``)."""
    if model_dir is not None and (Path(model_dir) / TOKENIZER_FILE).is_file():
        tok = BPETokenizer(Path(model_dir) / TOKENIZER_FILE)
        if tok.vocab_size > vocab_size:
            raise TokenizerError(
                f"{Path(model_dir) / TOKENIZER_FILE} has {tok.vocab_size} tokens but the model's "
                f"vocabulary has only {vocab_size}")
        if (Path(model_dir) / GENERATION_CONFIG_FILE).is_file():
            tok.eos_token_id = stop_token_id(model_dir, tok)
        tok.bos_token_id = prompt_start_token(model_dir, tok)
        tok.model_vocab_size = vocab_size
        return tok
    if vocab_size < 256:
        raise TokenizerError(
            f"this model has no {TOKENIZER_FILE} and its vocabulary ({vocab_size}) is too small for "
            "byte-level text; pass token ids instead")
    return ByteTokenizer()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from None


def stop_token_id(model_dir: str | Path, tokenizer: BPETokenizer) -> int | None:
    """Where generation stops for a Hugging Face checkpoint: ``<|im_end|>`` when the
    tokenizer defines it (Ouro's published configs say eos = bos = pad = 0,
    ``<|endoftext|>``, which ends no chat turn), else ``generation_config.json``'s
    ``eos_token_id`` (the first, if a list), else the tokenizer's end-of-text."""
    chat_end = tokenizer.token_to_id(CHAT_END_TOKEN)
    if chat_end is not None:
        return chat_end
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    eos = _read_json(path).get("eos_token_id") if path.is_file() else None
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    return tokenizer.eos_token_id


def prompt_start_token(model_dir: str | Path, tokenizer: BPETokenizer) -> int | None:
    """The token every text prompt starts with: ``bos_token`` when ``tokenizer_config.json``
    says ``add_bos_token`` (Nanbeige: ``<|im_start|>``), else None."""
    path = Path(model_dir) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        return None
    config = _read_json(path)
    if not isinstance(config, dict) or config.get("add_bos_token") is not True:
        return None
    text = _token_text(config.get("bos_token"))
    token = tokenizer.token_to_id(text) if text else None
    if token is None:
        raise TokenizerError(f"{path} says add_bos_token, but its bos_token {text!r} is not a token of "
                             f"{Path(model_dir) / TOKENIZER_FILE}")
    return token


def prompt_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """The ids of a text prompt: ``tokenizer.encode(text)`` after the tokenizer's
    beginning-of-text token when it has one (:func:`prompt_start_token`), as the
    checkpoint's own tokenizer encodes a prompt; never twice. (A chat prompt is
    encoded as it is: its template writes whatever start token the model wants.)"""
    ids = list(tokenizer.encode(text))
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[:1] != [bos]:
        ids.insert(0, bos)
    return ids


def chat_template(model_dir: str | Path) -> tuple[str, dict]:
    """The chat template of a checkpoint and its ``tokenizer_config.json`` (for the
    special-token strings a template may use)."""
    path = Path(model_dir) / TOKENIZER_CONFIG_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: this model has no chat template")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} is not a JSON object")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template
                         if isinstance(t, dict) and t.get("name") == "default"), None)
    jinja_file = Path(model_dir) / "chat_template.jinja"
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    if not isinstance(template, str):
        raise TokenizerError(f"{path} has no chat_template")
    return template, config


def _token_text(value: Any) -> str:
    """A special token of tokenizer_config.json as text (a string or {"content": ...})."""
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


# Template variables a caller's options may not replace.
_RESERVED_TEMPLATE_NAMES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                      "raise_exception"})


def render_chat(model_dir: str | Path, messages: str | Sequence[Mapping[str, str]],
                options: Mapping[str, Any] | None = None) -> str:
    """The checkpoint's chat template applied to ``messages`` (a string is one user
    message), with the prompt for the assistant's turn appended. ``options``: more
    template variables, such as ``{"enable_thinking": False}`` (a thinking model's
    template then opens the answer with an empty ``<think></think>``); a template
    that does not use one ignores it."""
    options = dict(options or {})
    reserved = sorted(_RESERVED_TEMPLATE_NAMES & set(options))
    if reserved:
        raise TokenizerError(f"chat template option {reserved[0]!r} is set by speedec, not by a caller")
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = [dict(m) for m in messages]
    if not messages:
        raise TokenizerError("a chat needs at least one message")
    template, config = chat_template(model_dir)

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            **options, messages=messages, add_generation_prompt=True,
            bos_token=_token_text(config.get("bos_token")), eos_token=_token_text(config.get("eos_token")))
    except jinja2.TemplateError as exc:
        raise TokenizerError(f"{Path(model_dir) / TOKENIZER_CONFIG_FILE}: chat template: {exc}") from None


def chat_prompt(model_dir: str | Path, messages: str | Sequence[Mapping[str, str]],
                options: Mapping[str, Any] | None = None) -> list[int]:
    """Prompt ids for a chat: :func:`render_chat` encoded with the checkpoint's
    ``tokenizer.json`` (special tokens in the text become their ids)."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(f"{path} is missing: a chat needs the model's own tokenizer")
    return BPETokenizer(path).encode(render_chat(model_dir, messages, options))


def train_bpe(files: Iterable[str | Path], out_path: str | Path, *, vocab_size: int = 8192,
              min_frequency: int = 2) -> BPETokenizer:
    """Train a byte-level BPE on text files and save it (atomically) as ``out_path``."""
    files = [str(f) for f in files]
    for f in files:
        if not Path(f).is_file():
            raise TokenizerError(f"training file {f} does not exist")
    return _train(lambda tok, trainer: tok.train(files, trainer), out_path, vocab_size, min_frequency)


def train_bpe_from_texts(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 8192,
                         min_frequency: int = 2) -> BPETokenizer:
    """Like :func:`train_bpe`, on an iterable of strings (e.g. both sides of a parallel corpus)."""
    return _train(lambda tok, trainer: tok.train_from_iterator(texts, trainer), out_path, vocab_size,
                  min_frequency)


def _train(run_trainer, out_path: str | Path, vocab_size: int, min_frequency: int) -> BPETokenizer:
    """Set up the byte-level BPE and its trainer, let ``run_trainer(tok, trainer)`` feed it, save it."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from .storage import atomic_write

    if vocab_size < 257:
        raise TokenizerError(f"vocab_size must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    tok = HFTokenizer(models.BPE())
    # No prefix space, so decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    run_trainer(tok, trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: tok.save(str(tmp)))
    return BPETokenizer(out_path)
