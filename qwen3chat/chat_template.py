"""Chat templates rendered in a sandboxed Jinja environment, as transformers renders them."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import QwenChatError
from .jsonfiles import read_json


def builtin_template(name: str) -> str:
    """A template shipped with the package (``qwen3``: Qwen3's hybrid-thinking one;
    ``qwen3_vl``: Qwen3-VL Instruct's), used when a model ships none that fits."""
    return resources.files("qwen3chat").joinpath(f"templates/{name}.jinja").read_text("utf-8")


def find_chat_template(model_dir: Path, requires: str | None = None) -> str | None:
    """The model's own chat template, looked up where transformers' processor and
    tokenizer look: ``chat_template.jinja``, ``chat_template.json``, then
    ``tokenizer_config.json`` (the default of several named ones); with ``requires``, the
    first that contains that text. None when there is none."""
    jinja_path = model_dir / "chat_template.jinja"
    candidates = [jinja_path.read_text(encoding="utf-8")] if jinja_path.is_file() else []
    for name in ("chat_template.json", "tokenizer_config.json"):
        template = read_json(model_dir / name).get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        candidates.append(template)
    for template in candidates:
        if isinstance(template, str) and (requires is None or requires in template):
            return template
    return None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    # Templates come with downloaded models: untrusted code, so sandboxed and immutable.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise QwenChatError(
            f"chat template: syntax error on line {e.lineno}: {e.message}"
        ) from None


def render_chat(
    source: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    tools: list[dict] | None = None,
) -> str:
    template = _compile(source)
    try:
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            **({"tools": tools} if tools else {}),
            **(special_tokens or {}),
        )
    except jinja2.TemplateError as e:
        raise QwenChatError(f"chat template: {e}") from None
