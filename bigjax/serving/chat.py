"""Chat messages to a prompt: the run's own Jinja chat template when its tokenizer directory
has one (`chat_template.jinja`, or `chat_template` in `tokenizer_config.json`, as Hugging Face
saves them), else PLAIN: a documented plain-text template for base models that were never
trained on a chat format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bigjax.config import ConfigError
from bigjax.data.tokenizer import IN_RUN

# Base models have no chat format; this one reads as a transcript, which a model pretrained
# on web text continues naturally, and ends where the assistant speaks next.
PLAIN = (
    "{% for m in messages %}"
    "{% if m['role'] in ('system', 'developer') %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def find_template(tokenizer_dir: Path | None) -> str | None:
    """The chat template saved in a run's tokenizer folder, None if it has none. A file that
    is not UTF-8 (or JSON that does not parse) is a ConfigError naming it: such a template is
    a user's file, added beside the dataset's tokenizer."""
    if tokenizer_dir is None:
        return None
    jinja, config = tokenizer_dir / "chat_template.jinja", tokenizer_dir / "tokenizer_config.json"
    path = jinja if jinja.is_file() else config
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        if path == jinja:
            return text
        raw = json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not JSON"
        raise ConfigError(f"the chat template file {path} is {what} ({e}); save it as UTF-8 "
                          f"{'JSON' if path == config else 'text'}.") from None  # fmt: skip
    template = raw.get("chat_template") if isinstance(raw, dict) else None
    return template if isinstance(template, str) else None


def template_dir(tokenizer_dir: Path | None, workdir: Path | None) -> Path | None:
    """Where a run's chat template is: its data's tokenizer folder (where a user may add one),
    else the run's own (`RUN/tokenizer`: an imported model's); None if neither has one."""
    kept = None if workdir is None else workdir / IN_RUN
    return next((d for d in (tokenizer_dir, kept) if find_template(d) is not None), None)


def render(template: str, messages: list[dict[str, Any]], *, add_generation_prompt: bool,
           bos_token: str = "", eos_token: str = "") -> str:  # fmt: skip
    """The prompt for `messages`, rendered in a sandbox (templates come with downloaded
    tokenizers: they must not reach Python objects)."""
    return (
        _sandbox()
        .from_string(template)
        .render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    )


def syntax_error(template: str) -> str | None:
    """None for a template Jinja can parse, else where and why it cannot: checked when the
    server starts, so a broken template is not a 400 that blames every client's messages."""
    from jinja2 import TemplateSyntaxError

    try:
        _sandbox().parse(template)
    except TemplateSyntaxError as e:
        return f"line {e.lineno}: {str(e.message).rstrip('.')}"
    return None


def _sandbox() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    return ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
