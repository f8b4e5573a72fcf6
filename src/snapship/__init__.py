"""snapship: block-level, deduplicating, encrypted backups of volumes and images."""

__version__ = "0.1.0"
