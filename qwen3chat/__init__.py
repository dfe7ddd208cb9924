"""qwen3chat: chat with Qwen3 models from the terminal."""

__version__ = "0.1.0"
