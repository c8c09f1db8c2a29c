"""The prepared-data cache is keyed on CACHE_FORMAT (and finetune's version): a change to the
code that turns rows into tokens must bump it, or a later run reuses tokens the old code made.
This test pins the digest of that code to the format number: when it fails, bump CACHE_FORMAT
in finetune/data/cache.py and paste the new pair below."""

from __future__ import annotations

import hashlib
from pathlib import Path

from finetune.data.cache import CACHE_FORMAT

DATA = Path(__file__).parents[2] / "finetune" / "data"
# Everything that decides the tokens and labels of a prepared sample.
TOKEN_CODE = [
    "sources.py",
    "prepare.py",
    "tokenize.py",
    "chat_templates.py",
    "strategies/*.py",
    "templates/*.jinja",
]
PINNED = (4, "02f33324477dbf0b")


def token_code_digest() -> str:
    digest = hashlib.sha256()
    for pattern in TOKEN_CODE:
        for path in sorted(DATA.glob(pattern)):
            digest.update(path.relative_to(DATA).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def test_token_code_changes_bump_the_cache_format():
    current = (CACHE_FORMAT, token_code_digest())
    assert current == PINNED, (
        f"the tokenization code changed (digest {current[1]}): bump CACHE_FORMAT in "
        f"finetune/data/cache.py and set PINNED = ({CACHE_FORMAT + 1}, '<new digest>') here"
        if current[0] == PINNED[0]
        else f"set PINNED = {current!r} in this test"
    )
