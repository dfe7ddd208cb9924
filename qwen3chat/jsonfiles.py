"""Reading the JSON files of a model's folder, with one-line errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import QwenChatError


def read_json(path: Path, needed_for: str | None = None) -> dict:
    """The JSON object in ``path``; {} when the file is absent, unless ``needed_for`` says
    why it must be there."""
    if not path.is_file():
        if needed_for:
            raise QwenChatError(f"{path}: not found; {needed_for}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QwenChatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise QwenChatError(f"{path}: expected a JSON object")
    return data
