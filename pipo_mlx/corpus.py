"""The demo corpus: the running Python's own standard library, split by file.

Every machine that runs this project has it, offline, and it is real code of
the kind the demo model should write. Test suites are left out: they are a
third of the library's bytes, mostly repetitive assertions, and some contain
deliberately broken files. The split is a hash of each file's path relative to
the library root, so it needs no stored list, never moves a file between splits
when files are added, and is the same on every machine with the same Python.
"""

import hashlib
import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

SPLITS = ("train", "valid", "test")
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_PERCENT = 5  # each of valid and test


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Optional[Path] = None) -> List[str]:
    """Relative POSIX paths of the library's *.py files, sorted."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not EXCLUDED_DIRS.intersection(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    return sorted(files)


def split_of(rel_path: str) -> str:
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) % 100
    if bucket < HELD_OUT_PERCENT:
        return "test"
    if bucket < 2 * HELD_OUT_PERCENT:
        return "valid"
    return "train"


def read_split(split: str, root: Optional[Path] = None) -> List[Tuple[str, str]]:
    """(relative path, source text) for every file of one split, in path order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    root = root or stdlib_root()
    return [
        # A handful of library files carry stray non-UTF-8 bytes in comments.
        (rel, (root / rel).read_text(encoding="utf-8", errors="replace"))
        for rel in corpus_files(root)
        if split_of(rel) == split
    ]
