"""Chat messages -> one prompt string.

The tokenizer's own chat template is used when it has one (`tokenizer.apply_chat_template`). Base models
such as the embedded stdlib-tiny have none; then this fallback (documented in docs/api.md) applies:

    <role>: <content>\n\n   for each message, in order
    assistant:              when add_generation_prompt (no trailing space: the model writes it)

It is deliberately plain text so a base model continues it sensibly.
"""

from __future__ import annotations

from .protocol_openai import ChatMessage

FALLBACK_TEMPLATE_DOC = "'<role>: <content>' blocks separated by a blank line, then 'assistant:'"


def has_chat_template(tokenizer: object) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def fallback_template(messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    text = "".join(f"{m.role}: {m.text()}\n\n" for m in messages)
    return text + ("assistant:" if add_generation_prompt else "")


def render_chat(tokenizer: object, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    """The prompt text for `messages`, from the tokenizer's template or the fallback."""
    if has_chat_template(tokenizer):
        conv = [{"role": m.role, "content": m.text()} for m in messages]
        return tokenizer.apply_chat_template(conv, tokenize=False,  # type: ignore[attr-defined]
                                             add_generation_prompt=add_generation_prompt)
    return fallback_template(messages, add_generation_prompt)
