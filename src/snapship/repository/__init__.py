"""The repository: chunks, manifests and keys on top of a storage backend; owns write order."""

from snapship.repository.repo import Repository

__all__ = ["Repository"]
