"""Download NIST's EMNIST archive and extract one split's files, resumably and verified."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from tqdm import tqdm

from .. import __version__
from ..errors import ConfigError, DownloadError
from .datasets import IDX_PARTS, Dataset, default_data_dir, find_dataset_files, find_file_names, load_dataset

__all__ = ["NIST_BASE_URL", "MIRROR_ENV", "SPLITS", "ARCHIVES", "ARCHIVE_MD5S", "MEMBER_MD5S", "resolve_mirror",
           "download_file", "download_emnist", "load_or_download"]

log = logging.getLogger(__name__)

NIST_BASE_URL = "https://biometrics.nist.gov/cs_links/EMNIST"
MIRROR_ENV = "EMNIST_CNN_MIRROR"

SPLITS = ("digits", "mnist", "letters", "balanced", "byclass", "bymerge")
ARCHIVES = ("gzip.zip", "matlab.zip")

# torchvision's EMNIST class pins this md5 for NIST's gzip.zip; mirrors serve the same file.
ARCHIVE_MD5S: Mapping[str, str] = MappingProxyType(
    {"gzip.zip": "58c8d27c78d21e728a6bc7b3cc06412e"}
)

MEMBER_MD5S: Mapping[str, str] = MappingProxyType(
    {
        "emnist-digits-train-images-idx3-ubyte.gz": "d2662ecdc47895a6bbfce25de9e9a677",
        "emnist-digits-test-images-idx3-ubyte.gz": "a159b8b3bd6ab4ed4793c1cb71a2f5cc",
        "emnist-digits-train-labels-idx1-ubyte.gz": "2223fcfee618ac9c89ef20b6e48bcf9e",
        "emnist-digits-test-labels-idx1-ubyte.gz": "8afde66ea51d865689083ba6bb779fac",
    }
)

_READ_SIZE = 1 << 20


class _Known:
    """Sentinel: use the md5 in ARCHIVE_MD5S for this archive, if any."""

    def __repr__(self) -> str:
        return "<known md5>"


_KNOWN = _Known()


class _HostUnreachable(DownloadError):
    """The server could not be contacted at all (refused, no route, DNS failure)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"could not reach {url} ({reason}); this machine may be offline")
        self.url = url
        self.reason = reason


class _Restart(Exception):
    """The partial file cannot be resumed; discard it and fetch from byte 0."""


def resolve_mirror(mirror: str | None) -> str:
    """Return `mirror`, else $EMNIST_CNN_MIRROR, else NIST_BASE_URL, without a trailing slash."""
    chosen = mirror or os.environ.get(MIRROR_ENV) or NIST_BASE_URL
    return chosen.rstrip("/")


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download `url` to `dest` via `dest.part`, resuming a partial file; verify `md5` if given.

    Skips the download when `dest` exists and matches `md5` (or `md5` is None).
    `timeout` is the longest wait for any data, in seconds. Returns `dest`.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None:
            log.info("%s already exists; not downloading it again", dest)
            return dest
        got = _file_md5(dest)
        if got == md5.lower():
            log.info("%s already exists with the expected md5; not downloading it again", dest)
            return dest
        # The old file stays until the verified new one replaces it atomically.
        log.warning("%s has md5 %s, expected %s; downloading it again", dest, got, md5)
    _make_dir(dest.parent)
    part = dest.with_name(dest.name + ".part")

    try:
        _fetch(url, part, timeout=timeout, progress=progress, chunk_size=chunk_size, desc=dest.name)
    except _Restart as exc:
        log.warning("%s; discarding %s and downloading from the start", exc, part)
        _unlink(part)
        try:
            _fetch(url, part, timeout=timeout, progress=progress, chunk_size=chunk_size, desc=dest.name)
        except _Restart as exc2:
            raise DownloadError(f"download of {url} failed: {exc2}") from exc2

    if md5 is not None:
        got = _file_md5(part)
        if got != md5.lower():
            _unlink(part)
            raise DownloadError(
                f"checksum mismatch for {url}: expected md5 {md5.lower()}, got {got}; "
                f"deleted the downloaded file {part}"
            )
        log.info("verified md5 of %s", dest.name)
    try:
        os.replace(part, dest)
    except OSError as exc:
        raise DownloadError(f"could not rename {part} to {dest}: {_why(exc)}") from exc
    return dest


def download_emnist(
    split: str = "digits",
    data_dir: Path | None = None,
    *,
    mirror: str | None = None,
    archive: str = "gzip.zip",
    archive_md5: str | None | _Known = _KNOWN,
    member_md5s: Mapping[str, str] = MEMBER_MD5S,
    timeout: float = 60.0,
    progress: bool = True,
    keep_archive: bool = True,
) -> list[Path]:
    """Download `<mirror>/<archive>` into `data_dir` and extract `split`'s files there, flat.

    `archive_md5` defaults to the known md5 of `archive` (None: not checked); `member_md5s`
    maps file names to md5s checked after extraction. Does nothing when all files exist.
    Returns the paths of the split's files.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown EMNIST split {split!r}; choose one of: {', '.join(SPLITS)}")
    if archive not in ARCHIVES:
        raise ConfigError(f"unknown EMNIST archive {archive!r}; choose one of: {', '.join(ARCHIVES)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    members = _needed_members(split, archive)
    targets = [data_dir / name.rsplit("/", 1)[-1] for name in members]
    if all(t.is_file() for t in targets):
        log.info("all %d files of EMNIST %s are already in %s", len(targets), split, data_dir)
        return targets

    if isinstance(archive_md5, _Known):
        archive_md5 = ARCHIVE_MD5S.get(archive)
    if archive_md5 is None:
        log.info("no checksum known for %s; it will not be verified", archive)
    url = f"{resolve_mirror(mirror)}/{archive}"
    archive_path = data_dir / archive
    _make_dir(data_dir)
    try:
        download_file(url, archive_path, md5=archive_md5, timeout=timeout, progress=progress)
    except _HostUnreachable as exc:
        raise DownloadError(
            f"could not reach {exc.url} ({exc.reason}); this machine may be offline: "
            f"download {archive} elsewhere and put the files in {data_dir}, or pass --mirror URL"
        ) from exc

    _extract(archive_path, members, targets, member_md5s)
    if not keep_archive:
        try:
            archive_path.unlink()
            log.info("deleted %s", archive_path)
        except OSError as exc:
            log.warning("could not delete %s: %s", archive_path, _why(exc))
    return targets


def load_or_download(name: str, data_dir=None, *, mirror=None, download: bool = True) -> tuple[Dataset, Path]:
    """`load_dataset`, downloading an EMNIST split first when its files are absent.

    Returns the dataset and the folder it was read from.
    """
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if find_dataset_files(name, data_dir) is None and download and name.startswith("emnist-"):
        log.debug("%s not found in %s: downloading it", name, data_dir)  # `_fetch` says so once connected
        download_emnist(name[len("emnist-"):], data_dir, mirror=mirror)
    return load_dataset(name, data_dir), data_dir


def _needed_members(split: str, archive: str) -> list[str]:
    names = find_file_names(f"emnist-{split}")
    if archive == "matlab.zip":
        return [f"matlab/{names['mat']}"]
    return [f"gzip/{names[part]}.gz" for part in IDX_PARTS] + [f"gzip/{names['mapping']}"]


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, chunk_size: int, desc: str) -> None:
    """Append the rest of `url` to `part`; raise _Restart when the partial file is unusable."""
    offset = part.stat().st_size if part.is_file() else 0
    # identity: a compressed transfer would make byte offsets meaningless for Range.
    headers = {"User-Agent": f"emnist-cnn/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416 and offset:
            _, total = _parse_content_range(exc.headers.get("Content-Range"))
            if total is None or total == offset:
                log.info("%s is already complete (%d bytes)", part, offset)
                return
            raise _Restart(f"{part} has {offset} bytes but {url} has {total}") from exc
        raise DownloadError(f"HTTP {exc.code} ({exc.reason}) for {url}") from exc
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise _stalled(url, timeout, part, offset) from exc
        if urllib.parse.urlsplit(url).scheme == "file":
            raise DownloadError(f"could not read {url} ({_why(exc.reason)})") from exc
        raise _HostUnreachable(url, _why(exc.reason)) from exc
    except TimeoutError as exc:
        # urllib lets a timeout while waiting for the response headers through unwrapped.
        raise _stalled(url, timeout, part, offset) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"request for {url} failed ({_why(exc)})") from exc
    except ValueError as exc:
        raise DownloadError(f"invalid URL {url!r} ({exc})") from exc

    with resp:
        # file:// responses have no HTTP status; they always send the whole file.
        status = getattr(resp, "status", None) or 200
        # Said once the server answers: a host that cannot be reached gets the error line alone.
        if status == 206:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != offset:
                raise _Restart(f"{url} answered a resume from byte {offset} with bytes from {start}")
            log.info("resuming %s from byte %d into %s", url, offset, part)
            mode = "ab"
        else:
            log.info("downloading %s to %s", url, part.with_name(part.name.removesuffix(".part")))
            if offset:
                log.info("%s ignored the resume request; downloading from the start", url)
                offset = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            mode = "wb"
        read = getattr(resp, "read1", resp.read)
        received = offset
        try:
            with open(part, mode) as fh, tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=desc,
                disable=not progress,
                file=sys.stderr,
            ) as bar:
                while True:
                    try:
                        chunk = read(chunk_size)
                    except TimeoutError as exc:
                        raise _stalled(url, timeout, part, received) from exc
                    except (OSError, http.client.HTTPException) as exc:
                        raise _interrupted(url, part, received, total, _why(exc)) from exc
                    if not chunk:
                        break
                    fh.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                fh.flush()
                # fsync so the later rename never exposes a file whose data is not on disk.
                os.fsync(fh.fileno())
        except OSError as exc:
            raise DownloadError(f"could not write {part}: {_why(exc)}") from exc
    if total is not None and received < total:
        raise _interrupted(url, part, received, total, "connection closed early")


def _extract(
    archive_path: Path, members: list[str], targets: list[Path], member_md5s: Mapping[str, str]
) -> None:
    """Extract `members` of `archive_path` to `targets`, atomically, after checking all names."""
    try:
        zf = zipfile.ZipFile(archive_path)
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        _unlink(archive_path)
        raise DownloadError(
            f"{archive_path} is not a valid zip archive ({_why(exc)}); "
            "deleted it, rerun to download it again"
        ) from exc
    with zf:
        infos = zf.infolist()
        # Refuse the whole archive: traversal names mean it is not NIST's file.
        for info in infos:
            _check_member_name(info.filename, archive_path)
        by_name = {info.filename: info for info in infos}
        by_base = {}
        for info in infos:
            by_base.setdefault(info.filename.rsplit("/", 1)[-1], info)
        log.info("extracting %d files from %s", len(members), archive_path)
        for name, target in zip(members, targets):
            # Fall back to the bare file name so a repacked mirror archive still works.
            info = by_name.get(name) or by_base.get(target.name)
            if info is None:
                raise DownloadError(f"{archive_path} has no member {name}; is it NIST's EMNIST archive?")
            _extract_member(zf, info, target, archive_path, member_md5s.get(target.name))


def _extract_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, archive_path: Path, md5: str | None
) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        try:
            with zf.open(info) as src, open(tmp, "wb") as dst:
                while chunk := src.read(_READ_SIZE):
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as exc:
            _unlink(archive_path)
            raise DownloadError(
                f"{archive_path} is corrupt: could not extract {info.filename} ({_why(exc)}); "
                "deleted it, rerun to download it again"
            ) from exc
        except OSError as exc:
            raise DownloadError(f"could not extract {info.filename} to {target}: {_why(exc)}") from exc
    except BaseException:
        # Also on Ctrl-C: never leave a half-written temp file behind.
        _unlink(tmp)
        raise
    got = digest.hexdigest()
    if md5 is None:
        log.info("no checksum known for %s; not verified", target.name)
    elif got != md5.lower():
        _unlink(tmp)
        raise DownloadError(
            f"checksum mismatch for {info.filename} in {archive_path}: expected md5 {md5.lower()}, "
            f"got {got}; deleted the extracted file (the archive may be corrupt: delete it and rerun)"
        )
    else:
        log.info("verified md5 of %s", target.name)
    try:
        os.replace(tmp, target)
    except OSError as exc:
        _unlink(tmp)
        raise DownloadError(f"could not rename {tmp} to {target}: {_why(exc)}") from exc


def _check_member_name(name: str, archive_path: Path) -> None:
    parts = re.split(r"[\\/]", name)
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise DownloadError(
            f"{archive_path} has an unsafe member name {name!r} (absolute or containing '..'); "
            "refusing to extract it"
        )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """Return (start, total) from 'bytes START-END/TOTAL' or 'bytes */TOTAL'; None if unknown."""
    m = re.fullmatch(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)\s*", value or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _stalled(url: str, timeout: float, part: Path, received: int) -> DownloadError:
    kept = f"{received} bytes kept in {part}" if received else "nothing received"
    return DownloadError(
        f"download of {url} stalled: no data for {timeout:g} s ({kept}); rerun to resume "
        "(`emnist-cnn download --timeout SECONDS` waits longer)"
    )


def _interrupted(url: str, part: Path, received: int, total: int | None, why: str) -> DownloadError:
    of_total = f" of {total}" if total is not None else ""
    return DownloadError(
        f"download of {url} was interrupted after {received}{of_total} bytes ({why}); "
        f"rerun to resume from {part}"
    )


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_READ_SIZE):
                digest.update(chunk)
    except OSError as exc:
        raise DownloadError(f"could not read {path}: {_why(exc)}") from exc
    return digest.hexdigest()


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"could not create directory {path}: {_why(exc)}") from exc


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not delete %s: %s", path, _why(exc))


def _why(exc: BaseException | str | None) -> str:
    """A short reason: the OS error text without '[Errno N]', else the exception's message."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc) if exc is not None else ""
    return text or type(exc).__name__
