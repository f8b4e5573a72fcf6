"""Export names and what they stand for; the only module of the server that reads manifests.

Names: `VOLUME@VERSION` (the full id, a unique prefix of it, or `latest`), `VOLUME` (its
newest version when the client connects), and the empty name (the newest version of the only
volume, if the repository holds exactly one). Every call blocks on the repository; the server
runs them on a worker thread. Manifests are immutable, so loaded versions are kept, in a
small LRU (a 1 TiB volume's index is 32 MiB).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from snapship.errors import NotFound, SnapshipError, UsageError
from snapship.formats.manifest import Manifest
from snapship.nbd.exports import VersionImage
from snapship.nbd.handshake import ExportInfo
from snapship.repository.repo import Repository
from snapship.types import VersionRef

log = logging.getLogger("snapship.nbd")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _when(version: str) -> str:
    """The time a version id encodes (`YYYYMMDD-HHMMSS.mmm-xxxx`), for people."""
    d, t = version[:8], version[9:19]
    if len(version) < 19 or not (d.isdigit() and t[:6].isdigit()):
        return version
    return f"{d[:4]}-{d[4:6]}-{d[6:]} {t[:2]}:{t[2:4]}:{t[4:]} UTC"


def describe(m: Manifest) -> str:
    text = f"{_size(m.size)}, created {m.created}, from {m.source}"
    if m.parent:
        text += f", parent {m.parent}"
    if m.labels:
        text += ", labels " + " ".join(f"{k}={v}" for k, v in sorted(m.labels.items()))
    return text


class ExportNames:
    def __init__(self, repo: Repository, *, read_only: bool, max_images: int = 8) -> None:
        self.repo = repo
        self.read_only = read_only
        self.max_images = max_images
        self._images: OrderedDict[str, VersionImage] = OrderedDict()
        self._lock = threading.Lock()

    def list_exports(self) -> list[tuple[str, str]]:
        """(name, description) of every export: each volume, then each of its versions.

        Reads no manifest (a repository may hold thousands of large ones): the version id
        says when it was made. NBD_OPT_INFO and NBD_OPT_GO describe an export in full.
        """
        by_volume: dict[str, list[str]] = {}
        for volume, version in self.repo.list_versions():
            by_volume.setdefault(volume, []).append(version)
        out = []
        for volume, versions in sorted(by_volume.items()):
            out.append((volume, f"newest version of {volume}: {volume}@{versions[-1]}"))
            out += [(f"{volume}@{v}", f"{volume} as of {_when(v)}") for v in versions]
        return out

    def resolve(self, name: str) -> tuple[str, str] | None:
        """(volume, version) an export name stands for now, or None."""
        volume, sep, version = name.partition("@")
        try:
            if not name:
                volumes = {v for v, _ in self.repo.list_versions()}
                if len(volumes) != 1:
                    return None
                volume = volumes.pop()
            return self.repo.resolve(VersionRef(volume, version if sep else None))
        except (NotFound, UsageError):
            return None

    def open(self, name: str) -> VersionImage | None:
        """The version an export name stands for, loaded and indexed; None if there is none."""
        found = self.resolve(name)
        if found is None:
            return None
        key = "@".join(found)
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
                return image
        try:
            m = self.repo.load_manifest(*found)
        except SnapshipError as e:
            log.error("cannot serve %s: %s", key, e)
            return None
        image = VersionImage(m)
        with self._lock:
            self._images[key] = image
            while len(self._images) > self.max_images:
                self._images.popitem(last=False)
        return image

    def info(self, image: VersionImage) -> ExportInfo:
        return ExportInfo(image.name, image.size, self.read_only, describe(image.manifest))
