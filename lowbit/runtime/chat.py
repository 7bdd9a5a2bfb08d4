"""The model's own chat template (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``, in the
artifact's tokenizer folder) rendered in Jinja's immutable sandbox, as transformers renders it: a template is data
from the artifact, so it can read the messages and nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from lowbit.errors import LowbitError
from lowbit.runtime.tokenizer_files import tokenizer_config

ROLES = ("system", "user", "assistant", "tool", "developer")
MAX_TEMPLATE = 1 << 20


def check_messages(messages) -> list[dict]:
    """``messages`` as [{"role", "content"}] with text content (OpenAI's list of text parts joined), refused in
    one line when malformed."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise LowbitError("messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise LowbitError(f"messages[{i}] must be an object with a role in {', '.join(ROLES)}")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise LowbitError(f"messages[{i}].content parts must be text parts ({{\"type\": \"text\", "
                                  "\"text\": ...}); this model reads text only")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise LowbitError(f"messages[{i}].content must be a string")
        out.append({"role": m["role"], "content": content})
    return out


class ChatTemplate:
    """``ChatTemplate.load(folder)``; ``render(messages)`` -> the prompt text, ending where the reply starts."""

    def __init__(self, source: str, special: dict):
        self.source, self.special = source, special
        try:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise LowbitError("chat templates need jinja2: pip install jinja2") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except Exception as e:  # noqa: BLE001  (jinja2's TemplateSyntaxError and what its parser raises)
            raise LowbitError(f"the artifact's chat template does not parse: {str(e)[:200]}") from None

    @classmethod
    def load(cls, folder: Path) -> Optional["ChatTemplate"]:
        config = tokenizer_config(folder) if folder.is_dir() else {}
        file = folder / "chat_template.jinja"
        if file.is_file():
            if file.stat().st_size > MAX_TEMPLATE:
                raise LowbitError(f"{file} is over {MAX_TEMPLATE} bytes; not a chat template")
            source = file.read_text(encoding="utf-8", errors="replace")
        else:
            source = config.get("chat_template")
            if isinstance(source, list):        # named templates: the default one
                source = next((t.get("template") for t in source if isinstance(t, dict)
                               and t.get("name") == "default"), None)
        if source is None:
            return None
        if not isinstance(source, str) or len(source) > MAX_TEMPLATE:
            raise LowbitError(f"the chat template in '{folder}' is not a string of at most {MAX_TEMPLATE} characters")
        special = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(source, special)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        messages = check_messages(messages)
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        **self.special)
        except LowbitError:
            raise
        except Exception as e:  # noqa: BLE001  (a template's own errors, and the sandbox's SecurityError)
            raise LowbitError(f"the chat template failed on these messages: {str(e)[:200]}") from None


def _token_text(token) -> Optional[str]:
    return token.get("content") if isinstance(token, dict) else token if isinstance(token, str) else None


def _raise(message):
    raise LowbitError(f"the chat template refused these messages: {str(message)[:200]}")
