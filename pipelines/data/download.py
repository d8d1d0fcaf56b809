"""Archives obtained and verified: reused, copied from a local directory, or downloaded.

For each archive the sources are tried in this order (fetch_archive):

1. <download_dir>/<filename>, when it is already there with the right md5 (reused).
   Its md5 is cached in a record "<filename>.md5.json" beside it, keyed on the file's
   size and mtime, so a 2 GB archive is hashed once, not on every run. The record only
   caches a hash; the comparison with the expected md5 happens every time. This trusts
   size and mtime, as DVC trusts them for its cache: bytes changed in place with both
   kept go unnoticed. verify=True (`fcn fetch --verify`) hashes the file again.
2. A local directory or file:// URL holding the archives. A local file whose md5 is
   wrong is an error naming the file and both sums. We do not fall through to the
   network: pointing at a local file says it is the one meant, and a silent 2 GB
   download would hide the mistake (often the md5s in params.yaml still being the
   official ones while local_dir holds the generated mirror). A local directory
   without the file falls through to the mirrors.
3. Each mirror URL in order (official host first). A download streams into
   "<filename>.part", resumes it with an HTTP Range request, and moves it to the final
   name only after the md5 matches; a mismatch deletes the .part and moves on to the
   next mirror. A host that cannot be reached (name resolution, refused connection,
   connect timeout) or answers 4xx is given up at once; a transfer that broke off
   mid-way, a read timeout or a 5xx is retried with exponential back-off.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import requests
import urllib3
from tqdm import tqdm

from fcn_models.errors import FCNError
from pipelines.core.console import say
from pipelines.core.files import file_md5
from pipelines.core.params import ArchiveParams
from pipelines.data.md5_record import forget_md5, recorded_md5, remember_md5

CHUNK_BYTES = 1 << 20
# Connecting is quick or never happens; a long connect timeout only delays the next mirror.
CONNECT_TIMEOUT_S = 10.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0
USER_AGENT = "fcn-workflow-fetch/0.1"
# What each archive must contain once extracted (relative to data.raw_dir).
GUIDANCE = (
    "If this machine has no network, point the stage at archives you already have: put "
    "VOCtrainval_11-May-2012.tar and benchmark.tgz in a directory and set data.local_dir to it "
    "in params.yaml (a path or a file:// URL), or pass --local-dir DIR. For a small generated "
    "stand-in, run `fcn demo-data --out DIR`, then set data.local_dir: DIR and data.voc.md5 / "
    "data.sbd.md5 to the md5s it prints."
)


class FetchError(FCNError, RuntimeError):
    """An expected failure: main() prints the message, without a traceback."""


class ChecksumError(FetchError):
    """Bytes whose md5 is not the expected one."""


class _MirrorUnusable(FetchError):
    """Waiting will not help: the host cannot be reached or refuses the file."""


class _TransferBroken(FetchError):
    """The transfer broke off or the server had a transient failure: worth another try."""


# ---------------------------------------------------------------------------------------
# md5, with a cached record beside the file


def _discard(path: Path) -> None:
    path.unlink(missing_ok=True)
    forget_md5(path)


# ---------------------------------------------------------------------------------------
# Download


def _local_path(location: str | os.PathLike) -> Path:
    text = os.fspath(location)
    if text.startswith("file:"):
        parsed = urllib.parse.urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise FetchError(f"{text}: only local file:// URLs are supported (file:///path/to/dir)")
        return Path(urllib.request.url2pathname(parsed.path))
    return Path(text)


def _progress(name: str, total: int | None, initial: int = 0) -> tqdm:
    # disable=None: no bar when stderr is not a terminal (DVC logs, CI); start/end lines still print.
    return tqdm(total=total, initial=initial, desc=name, unit="B", unit_scale=True,
                unit_divisor=1024, file=sys.stderr, disable=None, leave=False)


def _copy_verified(src: Path, dest: Path, md5: str, source: str) -> Path:
    """Copy src to dest through dest.part while hashing; dest appears only if the md5 matches."""
    part = dest.with_name(dest.name + ".part")
    say(f"fetch: copying {src} -> {dest}")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(src, "rb") as fin, open(part, "wb") as fout, _progress(dest.name, src.stat().st_size) as bar:
            while chunk := fin.read(CHUNK_BYTES):
                digest.update(chunk)
                fout.write(chunk)
                bar.update(len(chunk))
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    actual = digest.hexdigest()
    if actual != md5:
        part.unlink()
        raise ChecksumError(
            f"{src} (for {dest.name}, from {source}) has md5 {actual}, expected {md5}; it was not used. "
            f"Replace the file, or, if it is an archive written by `fcn demo-data`, put the md5s it "
            f"printed into params.yaml (data.voc.md5 / data.sbd.md5)."
        )
    os.replace(part, dest)
    remember_md5(dest, actual)
    return dest


def _cannot_connect(err: BaseException) -> bool:
    """True when the request never reached the server: bad name, refused, or connect timeout."""
    if isinstance(err, (requests.ConnectTimeout, requests.exceptions.SSLError)):
        return True
    seen, todo = set(), [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
                          socket.gaierror, ConnectionRefusedError)):
            return True
        todo += [getattr(e, "reason", None), e.__cause__, e.__context__]
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return False


def _content_range(resp: requests.Response) -> tuple[int | None, int | None]:
    """(start, total) from 'Content-Range: bytes START-END/TOTAL' or 'bytes */TOTAL'; None where absent."""
    value = resp.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    if unit != "bytes" or "/" not in rest:
        return None, None
    span, _, total = rest.partition("/")
    start = span.split("-")[0]
    return (int(start) if start.isdigit() else None), (int(total) if total.isdigit() else None)


def _request(session: requests.Session, url: str, offset: int, timeout_s: float) -> requests.Response:
    headers = {"Accept-Encoding": "identity"}  # byte ranges of the file itself, never of a re-encoding
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(url, headers=headers, stream=True, allow_redirects=True,
                           timeout=(min(CONNECT_TIMEOUT_S, timeout_s), timeout_s))
    except requests.ConnectionError as err:
        if _cannot_connect(err):
            raise _MirrorUnusable(f"{url}: cannot connect ({_root_cause(err)})") from None
        raise _TransferBroken(f"{url}: connection failed ({_root_cause(err)})") from None
    except requests.Timeout as err:
        raise _TransferBroken(f"{url}: no response within {timeout_s:g} s ({_root_cause(err)})") from None
    except requests.RequestException as err:
        raise _MirrorUnusable(f"{url}: {_root_cause(err)}") from None


def _root_cause(err: BaseException) -> str:
    """The innermost error's text: 'Name or service not known' says more than a wrapper's repr."""
    for _ in range(10):  # bounded: exception chains can loop
        inner = getattr(err, "reason", None) or err.__cause__ or err.__context__
        if not isinstance(inner, BaseException) or inner is err:
            break
        err = inner
    return str(err) or type(err).__name__


def _transfer(session: requests.Session, url: str, part: Path, timeout_s: float) -> None:
    """One request that continues (206) or restarts (200) `part`; returns once the body is complete."""
    offset = part.stat().st_size if part.exists() else 0
    resp = _request(session, url, offset, timeout_s)
    with resp:
        status = resp.status_code
        start, total = _content_range(resp)
        if offset and (status == 416 or (status == 206 and start != offset)):
            if status == 416 and total == offset:
                return  # the .part already holds every byte
            say(f"fetch: {url} cannot continue {part.name} from byte {offset}; starting over")
            part.unlink()
            resp.close()
            return _transfer(session, url, part, timeout_s)  # offset 0 now: no Range, no loop
        if status == 206:
            mode, expected, have = "ab", total, offset
        elif status == 200:
            if offset:
                say(f"fetch: {url} ignored the Range request; restarting {part.name} from byte 0")
            length = resp.headers.get("Content-Length", "")
            mode, expected, have = "wb", (int(length) if length.isdigit() else None), 0
        elif status in (408, 429) or status >= 500:
            raise _TransferBroken(f"{url}: HTTP {status} {resp.reason}")
        else:
            raise _MirrorUnusable(f"{url}: HTTP {status} {resp.reason}")

        with open(part, mode) as fh, _progress(part.name[: -len(".part")], expected, have) as bar:
            while True:
                try:
                    chunk = resp.raw.read(CHUNK_BYTES, decode_content=False)
                except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as err:
                    raise _TransferBroken(
                        f"{url}: transfer broke off after {have} bytes ({_root_cause(err)})") from None
                if not chunk:
                    break
                fh.write(chunk)
                have += len(chunk)
                bar.update(len(chunk))
    if expected is not None and have != expected:
        raise _TransferBroken(f"{url}: transfer ended after {have} of {expected} bytes")


def download(url: str, dest: Path, md5: str, *, timeout_s: float, retries: int) -> Path:
    """Fetch url into dest, resuming dest.part; dest appears only once its md5 matches.

    Raises ChecksumError (the .part is deleted) or FetchError; a transfer that keeps
    breaking off leaves its .part so that the next run resumes it.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith("file:"):
        return _copy_verified(_local_path(url), dest, md5, source=url)
    part = dest.with_name(dest.name + ".part")
    started = time.monotonic()
    resumed = part.stat().st_size if part.exists() else 0
    say(f"fetch: downloading {url} -> {dest}" + (f" (resuming at byte {resumed})" if resumed else ""))
    with requests.Session() as session:
        session.headers["User-Agent"] = USER_AGENT
        for attempt in range(retries + 1):
            try:
                _transfer(session, url, part, timeout_s)
                break
            except _TransferBroken as err:
                if attempt == retries:
                    kept = f"; {part} ({part.stat().st_size} bytes) is kept, the next run resumes it" \
                        if part.exists() else ""
                    raise _TransferBroken(f"{err}; gave up after {retries + 1} attempts{kept}") from None
                delay = min(BACKOFF_FIRST_S * 2 ** attempt, BACKOFF_MAX_S)
                say(f"fetch: {err}; retrying in {delay:g} s ({attempt + 1} of {retries})")
                time.sleep(delay)
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise ChecksumError(
            f"{dest.name} from {url} has md5 {actual}, expected {md5}; the download was deleted. "
            f"The mirror serves a different or damaged file."
        )
    os.replace(part, dest)
    remember_md5(dest, actual)
    size, seconds = dest.stat().st_size, time.monotonic() - started
    say(f"fetch: downloaded {dest.name}: {size} bytes in {seconds:.1f} s "
         f"({size / max(seconds, 1e-9) / 1e6:.1f} MB/s), md5 ok")
    return dest


def fetch_archive(spec: ArchiveParams, download_dir: Path, *, local_dir=None,
                  timeout_s: float = 30.0, retries: int = 3, verify: bool = False) -> Path:
    """The verified archive in download_dir: reused, copied from local_dir, or downloaded.
    verify: hash a reused archive again instead of trusting its record."""
    download_dir = Path(download_dir)
    download_dir.mkdir(parents=True, exist_ok=True)
    dest = download_dir / spec.filename
    local_src = _local_path(local_dir) / spec.filename if local_dir is not None else None
    if dest.is_file():
        actual = recorded_md5(dest, trust_record=not verify)
        if actual == spec.md5:
            say(f"fetch: reusing {dest} (md5 {'verified' if verify else 'ok'})")
            return dest
        if local_src is not None and local_src.is_file() and os.path.samefile(local_src, dest):
            # local_dir is the download directory: the file is the user's own, never delete it.
            raise ChecksumError(f"{dest} has md5 {actual}, expected {spec.md5}; it was not used.")
        say(f"fetch: {dest} has md5 {actual}, expected {spec.md5}; deleting it and fetching again")
    _discard(dest)  # also a record left without its archive

    failures = []
    if local_dir is not None:
        if not local_src.parent.is_dir():
            raise FetchError(f"data.local_dir / --local-dir {local_dir} is not a directory; "
                             f"point it at the directory holding {spec.filename}, or unset it.")
        src = local_src
        if src.is_file():
            return _copy_verified(src, dest, spec.md5, source=str(local_dir))
        say(f"fetch: {src} not found; trying the mirrors")
        failures.append(f"{src}: not found")

    for url in spec.mirrors:
        try:
            return download(url, dest, spec.md5, timeout_s=timeout_s, retries=retries)
        except FetchError as err:  # checksum, unreachable, or gave up: the next mirror may still serve it
            say(f"fetch: {err}")
            failures.append(str(err))
    if not spec.mirrors:
        failures.append("no mirrors configured")
    raise FetchError(
        f"could not obtain {spec.filename} (md5 {spec.md5}): " + "; ".join(failures) + ". " + GUIDANCE
    )


