"""Chat messages to prompt text.

A checkpoint whose `tokenizer_config.json` has a `chat_template` (a Hugging Face Jinja
template) is rendered with it, in a sandbox, with `add_generation_prompt=True` and the
config's `bos_token`/`eos_token`. Without one (the shipped jaxmoe-tiny has none) the
plain template is used: one line per message, "<role>: <content>", then "assistant:".
"""

from __future__ import annotations

import json
from pathlib import Path

PLAIN = "plain"


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
        return value.get("content", "")
    return value or ""


class ChatTemplate:
    def __init__(self, source: str | None = None, bos_token: str = "", eos_token: str = ""):
        self.source, self.bos_token, self.eos_token = source, bos_token, eos_token
        self._template = None
        if source:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._template = env.from_string(source)

    @property
    def name(self) -> str:
        return "tokenizer_config.json" if self.source else PLAIN

    @classmethod
    def for_checkpoint(cls, path: str | Path | None) -> "ChatTemplate":
        config = Path(path) / "tokenizer_config.json" if path else None
        if config is None or not config.is_file():
            return cls()
        data = json.loads(config.read_text())
        source = data.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        return cls(source, _token_text(data.get("bos_token")), _token_text(data.get("eos_token")))

    def render(self, messages: list[dict]) -> str:
        if self._template is None:
            return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                     eos_token=self.eos_token)  # fmt: skip


def _raise(message: str):
    raise ValueError(f"chat template: {message}")
