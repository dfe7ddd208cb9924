"""Pictures for Qwen3-VL: preprocess.py turns image and frame files into the tower's patches
as transformers' processors do; prompt.py lays them into chat prompts."""
