"""Byte-level codecs of the repository format v1 (see docs/format.md); no I/O here."""
