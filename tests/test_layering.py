"""The repository layer owns the key layout (issue 11): no module above it names a key.

Key names (`chunks/`, `versions/`, `locks/`, ...) live in `repository/layout.py` and are used
through `Catalog`; the object envelope's constants live in `formats/` and are used by
`repository/`. A module of the layers above (the engines, the servers, the CLI, the change
parsers, the device edge) that mentions either has let the layout leak upward again.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "snapship"
ABOVE = sorted([*SRC.glob("cli/*.py"), *SRC.glob("engine/*.py"), *SRC.glob("server/*.py"),
                *SRC.glob("nbd/*.py"), *SRC.glob("changes/*.py"), *SRC.glob("jobs/*.py"),
                *SRC.glob("filesystems/*.py"), *SRC.glob("snapspace/*.py"), SRC / "devices.py",
                SRC / "attach.py", SRC / "logreplay.py",
                SRC / "instant.py"])
KEY_NAMES = {"CONFIG_KEY", "KEY_KEY", "CHUNK_PREFIX", "FOSSIL_PREFIX", "VERSION_PREFIX",
             "REFS_PREFIX", "SUMMARY_PREFIX", "LOCK_PREFIX", "TOMBSTONE_PREFIX",
             "COLLECTION_KEY", "PROTECTED_PREFIX", "DAMAGED_PREFIX", "chunk_key", "fossil_key",
             "manifest_key", "refs_key", "summary_key", "lock_key", "tombstone_key",
             "protected_key", "damaged_key"}
ENVELOPE_NAMES = {"OBJECT_MAGIC", "OBJECT_VERSION", "OBJECT_HEADER_LEN", "KIND_CHUNK",
                  "KIND_MANIFEST", "KIND_REFS", "KIND_SUMMARY", "FLAG_ZSTD", "FLAG_ENCRYPTED",
                  "KNOWN_FLAGS", "NONCE_LEN", "TAG_LEN", "CHECKSUM_LEN"}
KEY_LITERAL = re.compile(r"^(chunks|fossils|versions|refs|summaries|locks|gc|protected|damaged"
                         r"|keys)/|^config$")


NOT_KEYS = {"cli/job_commands.py": {"config"}, "cli/main.py": {"config"}}
"""String constants that only look like keys: the `snapship config` command's name."""


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Name):
            name = node.id
        elif isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.alias):
            name = node.name.rsplit(".", 1)[-1]
        if name in KEY_NAMES | ENVELOPE_NAMES:
            found.append(f"line {getattr(node, 'lineno', '?')}: {name}")
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and KEY_LITERAL.search(node.value)
                and node.value not in NOT_KEYS.get(str(path.relative_to(SRC)), ())):
            found.append(f"line {node.lineno}: {node.value!r}")
    return found


def test_the_layers_are_where_the_layout_says() -> None:
    assert len(ABOVE) > 30, ABOVE


@pytest.mark.parametrize("path", ABOVE, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_above_the_repository_layer_names_a_key(path: Path) -> None:
    assert offences(path) == [], f"{path.relative_to(SRC)} knows the key layout"
