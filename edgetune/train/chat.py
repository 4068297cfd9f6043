"""Chat formatting: render the GGUF's own tokenizer.chat_template (jinja2, sandboxed)."""
from __future__ import annotations

from ..errors import EdgetuneError


def apply_chat_template(model, messages, add_generation_prompt: bool = True) -> str:
    """Render `messages` ([{"role","content"}]) with the model's template; plain text if it has none."""
    template = getattr(model, "chat_template", None)
    if not template:
        return "\n".join(m["content"] for m in messages)
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        tok = model.tokenizer
        return env.from_string(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=tok.piece(tok.bos_id) if tok.bos_id >= 0 else "",
            eos_token=tok.piece(tok.eos_id) if tok.eos_id >= 0 else "")
    except Exception as e:
        raise EdgetuneError(f"{model.path}: the chat template failed to render ({e})") from None
