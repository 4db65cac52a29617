"""A real text corpus available offline: the Python standard library's source, as bytes.

Files are split by a hash of their relative path (about 1 in 10 held out), so the
split is fixed for a given Python version and does not depend on file order.
"""

from __future__ import annotations

import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import torch

HELD_OUT_MOD = 10


def _stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/", "lib2to3/tests", "dist-packages/")):
            continue
        files.append((rel, path))
    return files


@lru_cache(maxsize=2)
def load_corpus(split: str) -> torch.Tensor:
    """All bytes of one split ('train' or 'heldout') as a uint8 tensor."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}")
    want_heldout = split == "heldout"
    chunks = []
    for rel, path in _stdlib_files():
        if (zlib.crc32(rel.encode()) % HELD_OUT_MOD == 0) == want_heldout:
            chunks.append(path.read_bytes())
    return torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).clone()


def prompts(n: int, length: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` prompts of `length` bytes drawn from held-out text, starting at line starts."""
    data = load_corpus("heldout")
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        i = int(torch.randint(0, len(data) - length - 1, (1,), generator=gen))
        nl = (data[i : i + 200] == 10).nonzero()
        if len(nl):
            i += int(nl[0]) + 1
        out.append(data[i : i + length].long())
    return out


@lru_cache(maxsize=4)
def word_ids(split: str, vocab_size: int) -> torch.Tensor:
    """The split as word-level token ids for a model with `vocab_size` tokens: words and punctuation
    ranked by frequency in the training split (the most frequent gets id 0), the rarer half of the
    id range shared by hashing. A real token stream (Zipf-distributed, with real repetition) for
    random-weight models, whose routing then depends on real text the way a trained model's does."""
    import re
    from collections import Counter

    pattern = re.compile(rb"\w+|[^\w\s]")
    ranks = {w: i for i, (w, _) in enumerate(Counter(pattern.findall(bytes(load_corpus("train").numpy()))).most_common(vocab_size // 2))}
    head = vocab_size // 2
    ids = [ranks.get(w, head + zlib.crc32(w) % (vocab_size - head)) for w in pattern.findall(bytes(load_corpus(split).numpy()))]
    return torch.tensor(ids, dtype=torch.long)
