"""Storage backends: where a repository's immutable objects live (see storage/base.py)."""
