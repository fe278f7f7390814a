"""Byte-level text for the main job: the corpus, and batches that depend only on (seed, step, rank)."""

from __future__ import annotations

import pathlib
import sysconfig

import torch
from torch import Tensor


class DataError(ValueError):
    """The data given cannot be trained on (missing path, too little text)."""


def stdlib_files() -> list[pathlib.Path]:
    """The Python standard library's own sources: text present on every machine, so the job runs offline."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py") if "site-packages" not in path.parts)


def data_files(path: str | None) -> list[pathlib.Path]:
    if path is None:
        return stdlib_files()
    where = pathlib.Path(path)
    if where.is_file():
        return [where]
    if where.is_dir():
        return sorted(p for p in where.rglob("*") if p.is_file())
    raise DataError(f"--data {path}: no such file or directory")


def load_corpus(path: str | None, max_bytes: int, context: int) -> Tensor:
    """Up to ``max_bytes`` of the files' bytes, in sorted file order (the same on every rank and run)."""
    chunks, total = [], 0
    for file in data_files(path):
        if total >= max_bytes:
            break
        try:
            chunk = file.read_bytes()[: max_bytes - total]
        except OSError:  # an unreadable file in a folder of text is skipped, as `grep -r` would
            continue
        chunks.append(chunk)
        total += len(chunk)
    corpus = b"".join(chunks)
    if len(corpus) <= context + 1:
        raise DataError(f"--data {path or 'stdlib'}: {len(corpus)} bytes, fewer than --context {context} + 2")
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


def batch(
    corpus: Tensor, *, seed: int, step: int, micro: int, rank: int, size: int, context: int
) -> tuple[Tensor, Tensor]:
    """Micro-batch ``micro`` of ``step`` on ``rank``: random windows drawn from a generator seeded by all four,
    so a resumed run (or a rerun) sees exactly the batches an uninterrupted one sees."""
    generator = torch.Generator().manual_seed((((seed * 1_000_003 + step) * 1_009 + micro) * 10_007 + rank) % 2**63)
    starts = torch.randint(0, corpus.numel() - context - 1, (size, 1), generator=generator)
    windows = corpus[starts + torch.arange(context + 1)].long()
    return windows[:, :-1], windows[:, 1:]
