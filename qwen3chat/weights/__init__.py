"""Reading checkpoints: formats in their own files, names mapped in names.py."""
