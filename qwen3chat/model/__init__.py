"""The Qwen3 network as plain nn.Modules; it reads no files and knows no text."""
