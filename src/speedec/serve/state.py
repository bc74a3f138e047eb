"""What the server's endpoints share (:class:`ServerState`) and the chat template they render."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import TokenizerError

# messages, template options (e.g. {"enable_thinking": False}) -> prompt text.
ChatRenderer = Callable[[list[dict], dict], str]


@dataclass
class ServerState:
    """What the endpoints share; ``app.state.speedec``."""

    scheduler: Any
    tokenizer: Any
    model_name: str
    chat: ChatRenderer | None
    # Where a completion stops (the tokenizer's end of text), and a chat turn.
    stop_token_ids: frozenset[int]
    chat_stop_token_ids: frozenset[int]
    vocab_size: int | None
    context_length: int | None
    retry_after_s: int
    # The model's loops: it is also served as NAME@loops=d, d < n_loops (None: NAME alone).
    n_loops: int | None = None
    # A recurrent-depth model also runs deeper than n_loops: NAME@loops=d for any d >= 1.
    any_depth: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    # True once the server is stopping: /health and new requests answer 503.
    draining: bool = False


def chat_renderer(model_dir: str | Path) -> ChatRenderer | None:
    """``messages -> prompt text`` through the checkpoint's chat template (the function
    ``speedec generate --chat`` uses), or None when the model directory has none."""
    from ..tokenizer import TOKENIZER_FILE, chat_template, render_chat

    try:
        chat_template(model_dir)
    except TokenizerError:
        return None
    if not (Path(model_dir) / TOKENIZER_FILE).is_file():
        return None  # a template's special tokens need the model's own tokenizer

    def render(messages: list[dict], options: dict) -> str:
        return render_chat(model_dir, messages, options)
    return render
