"""Pulling model files into the models folder: ``underpaint pull`` and ``POST /v3/model/pull``.

Sources: a plain ``http(s)://`` URL; ``hf:<owner>/<repo>/<path/in/repo>[@revision]`` (Hugging Face's ``resolve``
endpoint, which redirects to its CDN and names the file's sha256 and size in ``X-Linked-Etag``/``X-Linked-Size``);
``civitai:<model version id>`` (Civitai's ``/api/download/models/<id>``, which redirects to a signed URL and names the
file in ``Content-Disposition``).

A download goes to ``<models>/.pulls/<part_key(url)>.part``: an existing part is resumed with an HTTP ``Range``
request (a server that answers 200 instead starts it over). The finished file must have the announced size and, when one is
known (given, or from the hub's headers), the sha256; only then is it renamed into place, atomically, so the
registry never lists a half-written model. A truncated body keeps the part for the next try; a wrong checksum
deletes it. The kind (folder) is given, or told from the file's tensor names (``registry.kind_from_keys``).
``delivery/model_pulls.py`` runs pulls as durable jobs for the API.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import httpx

from underpaint.registry import KINDS, WEIGHT_SUFFIXES, kind_from_file

ProgressFn = Callable[[int, int | None], None]  # (bytes done, bytes expected or None)
_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


class PullError(ValueError):
    """A pull that cannot be done; ``str(exc)`` says why and what to do; ``field`` names the request field at
    fault when it is one (the API's 400 says so)."""

    def __init__(self, message: str, field: str = "source") -> None:
        super().__init__(message)
        self.field = field


def check_wanted(kind: str | None, sha256: str | None) -> None:
    """Raise ``PullError`` for a kind that is no models folder or a sha256 that is not 64 hex digits."""
    if kind is not None and kind not in KINDS:
        raise PullError(f"kind {kind!r}: expected one of {', '.join(KINDS)}", field="type")
    if sha256 is not None and not _HEX64.fullmatch(sha256.lower()):
        raise PullError("sha256: expected 64 hex digits", field="sha256")


@dataclass(frozen=True)
class PullSource:
    url: str
    name: str | None = None  # a file name the source itself implies (hf: the path's last part)


HF_ENDPOINT = "https://huggingface.co"
CIVITAI_ENDPOINT = "https://civitai.com"


def parse_source(source: str, hf_endpoint: str | None = None, civitai_endpoint: str | None = None) -> PullSource:
    """``URL | hf:owner/repo/path[@rev] | civitai:ID`` to the URL to fetch. The hubs' base URLs default to
    ``HF_ENDPOINT`` (or the environment's, as huggingface_hub reads it) and ``CIVITAI_ENDPOINT``."""
    hf = (hf_endpoint or os.environ.get("HF_ENDPOINT") or HF_ENDPOINT).rstrip("/")
    civitai = (civitai_endpoint or CIVITAI_ENDPOINT).rstrip("/")
    text = source.strip()
    if text.startswith("hf:"):
        spec, _, revision = text[3:].partition("@")
        parts = [p for p in spec.split("/") if p]
        if len(parts) < 3:
            raise PullError(f"{source!r}: expected hf:<owner>/<repo>/<file path>")
        owner, repo, path = parts[0], parts[1], "/".join(parts[2:])
        url = f"{hf}/{owner}/{repo}/resolve/{quote(revision or 'main')}/{quote(path)}"
        return PullSource(url, parts[-1])
    if text.startswith("civitai:"):
        version = text[len("civitai:") :]
        if not version.isdigit():
            raise PullError(f"{source!r}: expected civitai:<model version id> (digits)")
        return PullSource(f"{civitai}/api/download/models/{version}")
    if urlsplit(text).scheme in ("http", "https") and urlsplit(text).netloc:
        return PullSource(text)
    raise PullError(f"{source!r}: expected an http(s) URL, hf:<owner>/<repo>/<file> or civitai:<id>")


def part_key(url: str) -> str:
    """The partial file's name for a download URL: the next pull of the same source finds and resumes it."""
    return hashlib.sha256(url.encode()).hexdigest()[:24]


@dataclass
class PullResult:
    path: Path
    kind: str
    size: int
    sha256: str
    resumed_from: int = 0


def _filename(response: httpx.Response, source: PullSource) -> str:
    disposition = response.headers.get("content-disposition", "")
    star = re.search(r"filename\*\s*=\s*[^']*''([^;]+)", disposition)
    plain = re.search(r'filename\s*=\s*"?([^";]+)"?', disposition)
    if star:
        return unquote(star.group(1).strip())
    if plain:
        return plain.group(1).strip()
    if source.name:
        return source.name
    return unquote(urlsplit(str(response.url)).path.rsplit("/", 1)[-1])


def _safe_name(name: str) -> str:
    base = Path(name.replace("\\", "/")).name
    if not base or base.startswith(".") or not base.lower().endswith(WEIGHT_SUFFIXES):
        raise PullError(f"{name!r}: not a model file name (expected one of {', '.join(WEIGHT_SUFFIXES)})")
    return base


def _hub_sha256(response: httpx.Response) -> str | None:
    """Hugging Face names an LFS file's sha256 in ``X-Linked-Etag`` on the redirect (or the response)."""
    for r in [*response.history, response]:
        tag = str(r.headers.get("x-linked-etag", "")).strip('"').lower()
        if _HEX64.fullmatch(tag):
            return tag
    return None


def _total(response: httpx.Response, start: int) -> int | None:
    if response.status_code == 206:
        match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", response.headers.get("content-range", "").strip())
        if match is None or int(match.group(1)) != start:
            raise PullError(f"{response.url}: the server resumed at the wrong offset")
        return None if match.group(3) == "*" else int(match.group(3))
    length = response.headers.get("content-length")
    return int(length) if length is not None and length.isdigit() else None


def pull(
    source: str,
    models_dir: Path,
    *,
    kind: str | None = None,
    name: str | None = None,
    sha256: str | None = None,
    client: httpx.Client | None = None,
    on_progress: ProgressFn | None = None,
    overwrite: bool = False,
    hf_endpoint: str | None = None,
    civitai_endpoint: str | None = None,
) -> PullResult:
    """Download ``source`` into ``models_dir/<kind>/<name>`` (see the module docstring)."""
    check_wanted(kind, sha256)
    src = parse_source(source, hf_endpoint, civitai_endpoint)
    own_client = client is None
    http = client if client is not None else httpx.Client(timeout=httpx.Timeout(30.0, read=120.0))
    try:
        return _pull(
            src, Path(models_dir), kind, name, sha256.lower() if sha256 else None, http, on_progress, overwrite
        )
    except httpx.HTTPError as exc:
        raise PullError(f"{src.url}: {type(exc).__name__}: {exc}; run the pull again to resume") from exc
    finally:
        if own_client:
            http.close()


def _pull(
    src: PullSource,
    models_dir: Path,
    kind: str | None,
    name: str | None,
    sha256: str | None,
    http: httpx.Client,
    on_progress: ProgressFn | None,
    overwrite: bool,
) -> PullResult:
    staging = models_dir / ".pulls"
    staging.mkdir(parents=True, exist_ok=True)
    part = staging / (part_key(src.url) + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={start}-"} if start else {}
    with http.stream("GET", src.url, headers=headers, follow_redirects=True) as response:
        if response.status_code == 416 and start:  # the part is complete already (or stale): start over
            part.unlink()
            return _pull(src, models_dir, kind, name, sha256, http, on_progress, overwrite)
        if response.status_code not in (200, 206):
            raise PullError(f"{src.url}: HTTP {response.status_code}")
        final_name = _safe_name(name or _filename(response, src))
        expected = sha256 or _hub_sha256(response)
        if response.status_code == 200:
            start = 0
        total = _total(response, start)
        digest = hashlib.sha256()
        if start:
            with part.open("rb") as fh:
                for chunk in iter(lambda: fh.read(_CHUNK), b""):
                    digest.update(chunk)
        done = start
        with part.open("ab" if start else "wb") as out:
            for chunk in response.iter_bytes():  # as received: a cut connection keeps every byte that came
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if on_progress is not None:
                    on_progress(done, total)
            out.flush()
            os.fsync(out.fileno())
    if total is not None and done != total:
        raise PullError(f"{src.url}: got {done} of {total} bytes (truncated); run the pull again to resume")
    actual = digest.hexdigest()
    if expected is not None and actual != expected:
        part.unlink()
        raise PullError(
            f"{final_name}: sha256 {actual} does not match the expected {expected}; the download was deleted"
        )
    folder_kind = kind or kind_from_file(part, final_name)
    if folder_kind is None:
        raise PullError(f"{final_name}: cannot tell which kind of model this is from its tensors; give the kind")
    dest = models_dir / folder_kind / final_name
    if dest.exists() and not overwrite:
        part.unlink()
        raise PullError(f"{dest} exists already (pull with overwrite to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(part, dest)  # atomic: the registry sees the whole file or none
    return PullResult(dest, folder_kind, done, actual, resumed_from=start if response.status_code == 206 else 0)
