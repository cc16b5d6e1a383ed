"""The engine's own tokenization in the gateway (``--tokenizer``): the token ids the engine will see.

Routing keys only need *some* stable split of the prompt; the exact cache view needs the engine's
token ids, since it matches them against the tokens of the blocks the engine reports cached. So
tokenize as vLLM's OpenAI server does:

* completions: the prompt with the tokenizer's special tokens (``add_special_tokens=True``: a BOS
  for Llama-style tokenizers);
* chat: the messages rendered by the model's chat template (``tokenizer_config.json`` beside
  ``tokenizer.json``, with ``add_generation_prompt``), tokenized without special tokens (the
  template writes them). Without a template, or for messages whose content is not plain text,
  there are no exact ids: such a request is routed on the shadow view.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.openai_api import ChatCompletionRequest, CompletionRequest

Body = CompletionRequest | ChatCompletionRequest


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class EngineTokenizer:
    """``ids(body)``: the engine's token ids of a request's prompt, or None when they cannot be known."""

    def __init__(self, encode: Callable[[str, bool], list[int]],
                 render_chat: Callable[[list[dict[str, str]]], str | None] | None = None) -> None:
        self.encode = encode
        self.render_chat = render_chat

    @classmethod
    def load(cls, path: Path) -> EngineTokenizer:
        """``tokenizer.json``; its folder's ``tokenizer_config.json`` supplies the chat template."""
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise ValueError("tokenizer: needs the 'tokenizers' package (pip install 'tandem-serving[tokenizer]')") \
                from None
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exception for unreadable or malformed files
            raise ValueError(f"tokenizer: cannot load {path}: {exc}") from None

        def encode(text: str, special: bool) -> list[int]:
            return tok.encode(text, add_special_tokens=special).ids

        return cls(encode, _chat_renderer(path.parent / "tokenizer_config.json"))

    def ids(self, body: Body) -> list[int] | None:
        if isinstance(body, CompletionRequest):
            return self.encode(body.prompt_text(), True)
        if self.render_chat is None or any(not isinstance(m.content, str | None) for m in body.messages):
            return None
        text = self.render_chat([{"role": m.role, "content": m.content or ""} for m in body.messages])
        return None if text is None else self.encode(text, False)

    def pieces(self, text: str) -> list[str]:
        """Token ids as strings, the routing keys' units (no special tokens: keys of the text alone)."""
        return [str(i) for i in self.encode(text, False)]


def _chat_renderer(config_path: Path) -> Callable[[list[dict[str, str]]], str | None] | None:
    """The model's chat template as a function of the messages, or None when it has none."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    source = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    if not isinstance(source, str):
        return None
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError("tokenizer: the chat template needs the 'jinja2' package "
                         "(pip install 'tandem-serving[tokenizer]')") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    # As Hugging Face renders chat templates: blocks trimmed, a sandbox, loop controls.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    try:
        template = env.from_string(source)
    except TemplateError as exc:
        raise ValueError(f"tokenizer: the chat template of {config_path} does not parse: {exc}") from None
    specials = {k: t for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                if (t := _token_text(config.get(k))) is not None}

    def render(messages: list[dict[str, str]]) -> str | None:
        """The prompt text, or None when the template refuses the messages (its raise_exception)."""
        try:
            return template.render(messages=messages, add_generation_prompt=True, **specials)
        except TemplateError:
            return None

    return render
