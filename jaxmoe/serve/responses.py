"""The response bodies OpenAI sends, for completions and chat, whole or streamed in
chunks. Extensions: `token_ids`, the generated ids, as generate.py reports them; and on
every body of a server whose decode skips missed low-weight experts (--skip-below),
`"approximate": true` (its tokens need not be the exact model's)."""

from __future__ import annotations

import dataclasses

from jaxmoe.serve.request import Done


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}  # fmt: skip


@dataclasses.dataclass
class ResponseBodies:
    """The bodies of one response `id`."""

    id: str
    model: str
    chat: bool
    created: int
    approximate: bool = False

    def head(self, kind: str) -> dict:
        head = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        return {**head, "approximate": True} if self.approximate else head

    def chunk(self, delta, finish_reason: str | None, token_ids: list[int] | None = None) -> dict:
        if self.chat:
            delta = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta, "finish_reason": finish_reason, "logprobs": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return {**self.head("text_completion"), "choices": [choice]}

    def usage_chunk(self, done: Done) -> dict:
        """The last chunk of a stream that asked for usage (no choices)."""
        return {**self.head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(done)}  # fmt: skip

    def whole(self, text: str, token_ids: list[int], done: Done) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": done.finish_reason,
                      "logprobs": None, "token_ids": token_ids}  # fmt: skip
            return {**self.head("chat.completion"), "choices": [choice], "usage": usage(done)}
        choice = {"index": 0, "text": text, "finish_reason": done.finish_reason, "logprobs": None,
                  "token_ids": token_ids}  # fmt: skip
        return {**self.head("text_completion"), "choices": [choice], "usage": usage(done)}
