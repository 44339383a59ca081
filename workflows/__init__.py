"""Thin entry points: ``python -m workflows.<name>``. Each parses, builds a config, calls tl."""
