"""Tests for emnist_cnn.io.download against a local HTTP server on 127.0.0.1 (never the internet)."""

from __future__ import annotations

import gzip
import logging
import random
import socket
import struct
import time
from pathlib import Path

import pytest

from localhttp import STALL_SECONDS, STALL_TIMEOUT, make_zip, md5

from emnist_cnn.io import download as dl
from emnist_cnn.io.datasets import default_data_dir
from emnist_cnn.errors import ConfigError, DownloadError

# Every test here: only 127.0.0.1 resolves, and no proxy or mirror setting leaks in.
pytestmark = pytest.mark.usefixtures("offline_network")

IDX_PARTS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "test-images-idx3-ubyte",
    "test-labels-idx1-ubyte",
)


# --------------------------------------------------------------------------- fake EMNIST archive


def idx_images(n: int, rng: random.Random) -> bytes:
    return struct.pack(">IIII", 0x803, n, 28, 28) + rng.randbytes(n * 28 * 28)


def idx_labels(n: int, rng: random.Random) -> bytes:
    return struct.pack(">II", 0x801, n) + bytes(rng.randrange(10) for _ in range(n))


def split_files(split: str, rng: random.Random) -> dict[str, bytes]:
    """File name -> content for one split, as in NIST's gzip/ folder."""
    files = {}
    for part in IDX_PARTS:
        n = 12 if part.startswith("train") else 4
        raw = idx_images(n, rng) if "images" in part else idx_labels(n, rng)
        files[f"emnist-{split}-{part}.gz"] = gzip.compress(raw, mtime=0)
    files[f"emnist-{split}-mapping.txt"] = "".join(f"{i} {48 + i}\n" for i in range(10)).encode()
    return files


@pytest.fixture(scope="module")
def emnist():
    """A small gzip.zip with NIST's layout: digits and mnist splits."""
    rng = random.Random(0)
    files = {**split_files("digits", rng), **split_files("mnist", rng)}
    data = make_zip({f"gzip/{name}": content for name, content in files.items()})
    digits = {name: content for name, content in files.items() if "-digits-" in name}
    return {
        "zip": data,
        "md5": md5(data),
        "files": files,
        "digits": digits,
        "member_md5s": {name: md5(content) for name, content in files.items() if "-digits-" in name},
    }


def fetch(server, data_dir, emnist, **kwargs):
    """download_emnist from the local server with the fake archive's checksums."""
    kwargs.setdefault("mirror", server.url)
    kwargs.setdefault("archive_md5", emnist["md5"])
    kwargs.setdefault("member_md5s", emnist["member_md5s"])
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout", 5.0)
    return dl.download_emnist("digits", data_dir, **kwargs)


# --------------------------------------------------------------------------- download_emnist


def test_downloads_and_extracts_only_the_split(server, emnist, tmp_path):
    server.files["/gzip.zip"] = emnist["zip"]
    data_dir = tmp_path / "data"
    paths = fetch(server, data_dir, emnist)

    assert [p.name for p in paths] == [f"emnist-digits-{part}.gz" for part in IDX_PARTS] + [
        "emnist-digits-mapping.txt"
    ]
    for p in paths:
        assert p.parent == data_dir
        assert p.read_bytes() == emnist["files"][p.name]
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([*emnist["digits"], "gzip.zip"])
    assert (data_dir / "gzip.zip").read_bytes() == emnist["zip"]
    assert server.requests == [("/gzip.zip", None)]


def test_second_call_with_files_present_makes_no_request(server, emnist, tmp_path, caplog):
    server.files["/gzip.zip"] = emnist["zip"]
    first = fetch(server, tmp_path, emnist)
    n = len(server.requests)
    with caplog.at_level(logging.INFO, logger="emnist_cnn.io.download"):
        second = fetch(server, tmp_path, emnist)
    assert second == first
    assert len(server.requests) == n
    assert "already in" in caplog.text


def test_archive_present_is_reused_without_a_request(server, emnist, tmp_path):
    (tmp_path / "gzip.zip").write_bytes(emnist["zip"])
    paths = fetch(server, tmp_path, emnist)
    assert server.requests == []
    assert all(p.read_bytes() == emnist["files"][p.name] for p in paths)


def test_keep_archive_false_deletes_the_archive(server, emnist, tmp_path):
    server.files["/gzip.zip"] = emnist["zip"]
    paths = fetch(server, tmp_path, emnist, keep_archive=False)
    assert not (tmp_path / "gzip.zip").exists()
    assert all(p.is_file() for p in paths)


def test_wrong_archive_checksum_deletes_the_file(server, emnist, tmp_path):
    server.files["/gzip.zip"] = emnist["zip"]
    with pytest.raises(DownloadError, match=r"checksum mismatch .*expected md5 0{32}, got "
                       + emnist["md5"] + r".*deleted"):
        fetch(server, tmp_path, emnist, archive_md5="0" * 32)
    assert list(tmp_path.iterdir()) == []


def test_default_archive_checksum_is_nists_for_gzip_zip(server, emnist, tmp_path):
    server.files["/gzip.zip"] = emnist["zip"]
    with pytest.raises(DownloadError, match="expected md5 58c8d27c78d21e728a6bc7b3cc06412e"):
        dl.download_emnist("digits", tmp_path, mirror=server.url, progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_matlab_archive_has_no_default_checksum(server, tmp_path):
    server.files["/matlab.zip"] = make_zip(
        {"matlab/emnist-digits.mat": b"MATLAB 5.0", "matlab/emnist-mnist.mat": b"x"}
    )
    paths = dl.download_emnist(
        "digits", tmp_path, mirror=server.url, archive="matlab.zip", progress=False, timeout=5
    )
    assert paths == [tmp_path / "emnist-digits.mat"]
    assert paths[0].read_bytes() == b"MATLAB 5.0"
    assert not (tmp_path / "emnist-mnist.mat").exists()


@pytest.mark.parametrize("table", ["wrong", "default"])
def test_member_checksum_mismatch_deletes_the_file(server, emnist, tmp_path, table):
    server.files["/gzip.zip"] = emnist["zip"]
    name = "emnist-digits-train-images-idx3-ubyte.gz"
    md5s = {**emnist["member_md5s"], name: "f" * 32} if table == "wrong" else dl.MEMBER_MD5S
    pattern = rf"checksum mismatch for gzip/{name} .*deleted the extracted file"
    with pytest.raises(DownloadError, match=pattern):
        fetch(server, tmp_path, emnist, member_md5s=md5s)
    assert not (tmp_path / name).exists()
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_unknown_member_checksum_is_logged(server, emnist, tmp_path, caplog):
    server.files["/gzip.zip"] = emnist["zip"]
    with caplog.at_level(logging.INFO, logger="emnist_cnn.io.download"):
        fetch(server, tmp_path, emnist, member_md5s={})
    assert "no checksum known for emnist-digits-mapping.txt" in caplog.text


@pytest.mark.parametrize("bad_name", ["../evil", "/abs/evil", "gzip/../../evil", "..\\evil"])
def test_zip_slip_member_is_refused(server, emnist, tmp_path, bad_name):
    members = {f"gzip/{n}": c for n, c in emnist["digits"].items()}
    members[bad_name] = b"pwned"
    server.files["/gzip.zip"] = make_zip(members)
    data_dir = tmp_path / "a" / "data"
    with pytest.raises(DownloadError, match=r"unsafe member name .*refusing"):
        fetch(server, data_dir, emnist, archive_md5=None)
    assert sorted(p.name for p in data_dir.iterdir()) == ["gzip.zip"]  # nothing extracted
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != data_dir] == []
    assert not Path("/abs/evil").exists()


def test_garbage_archive_is_reported_and_deleted(server, emnist, tmp_path):
    server.files["/gzip.zip"] = emnist["zip"][: len(emnist["zip"]) // 2]  # truncated: no directory
    with pytest.raises(DownloadError, match=r"gzip\.zip is not a valid zip archive"):
        fetch(server, tmp_path, emnist, archive_md5=None)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_member_data_is_reported(server, emnist, tmp_path):
    data = bytearray(emnist["zip"])
    data[200] ^= 0xFF  # inside the first member's stored data: CRC check fails
    server.files["/gzip.zip"] = bytes(data)
    with pytest.raises(DownloadError, match=r"gzip\.zip is corrupt: could not extract gzip/emnist-digits"):
        fetch(server, tmp_path, emnist, archive_md5=None)
    assert list(tmp_path.iterdir()) == []


def test_missing_member_is_reported(server, emnist, tmp_path):
    server.files["/gzip.zip"] = make_zip({"gzip/emnist-mnist-mapping.txt": b"0 48\n"})
    with pytest.raises(DownloadError, match=r"has no member gzip/emnist-digits-train-images"):
        fetch(server, tmp_path, emnist, archive_md5=None)


def test_unreachable_host_gives_the_offline_message(emnist, tmp_path, closed_port):
    url = f"http://127.0.0.1:{closed_port}"
    with pytest.raises(DownloadError) as info:
        dl.download_emnist("digits", tmp_path, mirror=url, progress=False, timeout=2)
    msg = str(info.value)
    assert msg.startswith(f"could not reach {url}/gzip.zip (Connection refused); this machine may be offline")
    assert f"download gzip.zip elsewhere and put the files in {tmp_path}, or pass --mirror URL" in msg
    assert "\n" not in msg


def test_dns_failure_gives_the_offline_message(tmp_path):
    # The autouse fixture makes any non-local name fail to resolve, without touching the network.
    with pytest.raises(DownloadError, match=r"could not reach http://emnist\.invalid/gzip\.zip .*offline"):
        dl.download_emnist("digits", tmp_path, mirror="http://emnist.invalid", progress=False, timeout=2)


def test_http_error_names_the_url(server, emnist, tmp_path):
    with pytest.raises(DownloadError, match=rf"HTTP 404 \(Not Found\) for {server.url}/gzip.zip"):
        fetch(server, tmp_path, emnist)


def test_mirror_env_and_argument(server, emnist, tmp_path, monkeypatch):
    server.files["/env/gzip.zip"] = emnist["zip"]
    server.files["/arg/gzip.zip"] = emnist["zip"]
    monkeypatch.setenv(dl.MIRROR_ENV, server.url + "/env/")
    fetch(server, tmp_path / "a", emnist, mirror=None)
    fetch(server, tmp_path / "b", emnist, mirror=server.url + "/arg")
    assert [p for p, _ in server.requests] == ["/env/gzip.zip", "/arg/gzip.zip"]


def test_file_url_mirror(emnist, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "gzip.zip").write_bytes(emnist["zip"])
    paths = dl.download_emnist(
        "digits", tmp_path / "data", mirror=(tmp_path / "src").as_uri(), archive_md5=emnist["md5"],
        member_md5s=emnist["member_md5s"], progress=False,
    )
    assert len(paths) == 5


def test_data_dir_from_env(server, emnist, tmp_path, monkeypatch):
    server.files["/gzip.zip"] = emnist["zip"]
    monkeypatch.setenv("EMNIST_CNN_DATA", str(tmp_path / "envdata"))
    paths = dl.download_emnist(
        mirror=server.url, archive_md5=emnist["md5"], member_md5s=emnist["member_md5s"], progress=False
    )
    assert all(p.parent == tmp_path / "envdata" for p in paths)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_data_dir() == tmp_path / "home" / ".cache" / "emnist-cnn" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_data_dir() == tmp_path / "home" / ".cache" / "emnist-cnn" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "emnist-cnn" / "data"
    monkeypatch.setenv("EMNIST_CNN_DATA", "~/emnist")
    assert default_data_dir() == tmp_path / "home" / "emnist"


def test_resolve_mirror(monkeypatch):
    assert dl.resolve_mirror(None) == dl.NIST_BASE_URL
    monkeypatch.setenv(dl.MIRROR_ENV, "http://env.example/x/")
    assert dl.resolve_mirror(None) == "http://env.example/x"
    assert dl.resolve_mirror("http://arg.example//") == "http://arg.example"


def test_bad_split_or_archive():
    with pytest.raises(ConfigError, match="unknown EMNIST split 'digit'"):
        dl.download_emnist("digit")
    with pytest.raises(ConfigError, match="unknown EMNIST archive"):
        dl.download_emnist("digits", archive="tar.gz")


# --------------------------------------------------------------------------- download_file


@pytest.fixture
def blob(server):
    data = random.Random(1).randbytes(200_000)
    server.files["/blob.bin"] = data
    return data


def get(server, dest, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("timeout", 5.0)
    return dl.download_file(server.url + "/blob.bin", dest, **kwargs)


def test_download_file_verifies_md5(server, blob, tmp_path):
    dest = tmp_path / "sub" / "blob.bin"
    assert get(server, dest, md5=md5(blob).upper()) == dest
    assert dest.read_bytes() == blob
    assert not dest.with_name("blob.bin.part").exists()


def test_existing_file_with_right_md5_is_not_downloaded(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(blob)
    get(server, dest, md5=md5(blob))
    assert server.requests == []


def test_existing_file_with_wrong_md5_is_downloaded_again(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"stale")
    get(server, dest, md5=md5(blob))
    assert dest.read_bytes() == blob
    assert len(server.requests) == 1


def test_resumes_a_partial_download(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    k = 70_000
    dest.with_name("blob.bin.part").write_bytes(blob[:k])
    get(server, dest, md5=md5(blob))
    assert server.ranges() == [f"bytes={k}-"]
    assert dest.read_bytes() == blob


def test_server_ignoring_range_restarts_from_zero(server, blob, tmp_path):
    server.ignore_range = True
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(b"x" * 50_000)  # wrong bytes: must be discarded
    get(server, dest, md5=md5(blob))
    assert server.ranges() == ["bytes=50000-"]
    assert dest.read_bytes() == blob


def test_complete_part_file_gets_416_and_is_verified(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(blob)
    get(server, dest, md5=md5(blob))
    assert dest.read_bytes() == blob


def test_oversized_part_file_is_discarded(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    dest.with_name("blob.bin.part").write_bytes(blob + b"junk")
    get(server, dest, md5=md5(blob))
    assert server.ranges() == [f"bytes={len(blob) + 4}-", None]
    assert dest.read_bytes() == blob


def test_interrupted_download_raises_and_retry_resumes(server, blob, tmp_path):
    dest = tmp_path / "blob.bin"
    server.cut_after = 60_000
    with pytest.raises(DownloadError, match=r"interrupted after 60000 of 200000 bytes .*rerun to resume"):
        get(server, dest, md5=md5(blob))
    assert not dest.exists()
    assert dest.with_name("blob.bin.part").stat().st_size == 60_000
    server.cut_after = None
    get(server, dest, md5=md5(blob))
    assert server.ranges() == [None, "bytes=60000-"]
    assert dest.read_bytes() == blob


@pytest.mark.parametrize("where", ["headers", "body", "mid-body"])
def test_stalled_server_times_out(server, blob, tmp_path, where):
    if where == "headers":
        server.stall_headers = True
    else:
        server.stall_after = 0 if where == "body" else 100_000
    dest = tmp_path / "blob.bin"
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=rf"stalled: no data for {STALL_TIMEOUT} s.*rerun to resume"):
        get(server, dest, timeout=STALL_TIMEOUT)
    assert server.stalled.is_set()  # the timeout is the server's stall...
    assert time.monotonic() - t0 < STALL_SECONDS / 2  # ...and the client gave up long before the stall ended
    if where == "mid-body":  # what arrived is kept for the next attempt
        assert dest.with_name("blob.bin.part").stat().st_size == 100_000
        server.stall_after = None
        get(server, dest, md5=md5(blob))
        assert server.ranges()[-1] == "bytes=100000-"
        assert dest.read_bytes() == blob


def test_progress_bar_goes_to_stderr_and_can_be_disabled(server, blob, tmp_path, capsys):
    get(server, tmp_path / "a.bin", progress=False)
    assert capsys.readouterr().err == ""
    get(server, tmp_path / "b.bin", progress=True)
    captured = capsys.readouterr()
    assert "b.bin" in captured.err and captured.out == ""


# --------------------------------------------------------------------------- stalls, through the command line


def _cli_download(data_dir, mirror, *extra, timeout=60):
    """`emnist-cnn download` in a subprocess, as a user runs it (no proxy, no mirror from the environment)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
           and k not in (dl.MIRROR_ENV, "EMNIST_CNN_DATA")}
    return subprocess.run([sys.executable, "-m", "emnist_cnn", "download", "--data-dir", str(data_dir),
                           "--mirror", mirror, "--format", "mat", *extra], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


@pytest.fixture
def matlab_zip():
    mat = random.Random(2).randbytes(200_000)
    return {"mat": mat, "zip": make_zip({"matlab/emnist-digits.mat": mat})}


def test_cli_download_from_a_silent_server_stops_with_one_line_then_resumes(server, matlab_zip, tmp_path):
    """A server that accepts the connection and never answers: a clear stall after --timeout, no traceback."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever reads or answers
    data_dir = tmp_path / "data"
    try:
        t0 = time.monotonic()
        r = _cli_download(data_dir, f"http://127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1", timeout=120)
        elapsed = time.monotonic() - t0
    finally:
        silent.close()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    [line] = _error_lines(r.stderr)
    assert line.startswith("emnist-cnn: error: download of ") and "stalled: no data for 1 s" in line
    assert "nothing received" in line and "rerun to resume" in line
    assert elapsed < 45  # the timeout (and the process's start-up on a busy machine), not the default 60 s
    assert not (data_dir / "emnist-digits.mat").exists()
    # A later run against a good server gets the file.
    server.files["/matlab.zip"] = matlab_zip["zip"]
    r = _cli_download(data_dir, server.url, "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(data_dir / "emnist-digits.mat")
    assert (data_dir / "emnist-digits.mat").read_bytes() == matlab_zip["mat"]


def test_cli_download_stalled_mid_body_keeps_the_part_and_the_next_run_resumes(server, matlab_zip, tmp_path):
    """Headers and part of the body, then silence: the partial file is kept and the next run resumes it."""
    server.files["/matlab.zip"] = matlab_zip["zip"]
    server.stall_after = 100_000
    data_dir = tmp_path / "data"
    r = _cli_download(data_dir, server.url, "--timeout", str(STALL_TIMEOUT))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert server.stalled.is_set()
    [line] = _error_lines(r.stderr)
    part = data_dir / "matlab.zip.part"
    assert f"stalled: no data for {STALL_TIMEOUT} s" in line and f"100000 bytes kept in {part}" in line
    assert part.stat().st_size == 100_000
    server.stall_after = None
    r = _cli_download(data_dir, server.url, "--timeout", "5")
    assert r.returncode == 0, r.stderr
    assert server.ranges() == [None, "bytes=100000-"]  # resumed, not started again
    assert (data_dir / "emnist-digits.mat").read_bytes() == matlab_zip["mat"]
    assert not part.exists()


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_cli_download_timeout_must_be_a_positive_number(tmp_path, value):
    r = _cli_download(tmp_path / "data", "http://127.0.0.1:9", "--timeout", value, timeout=30)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--timeout" in lines[0], r.stderr
    assert not (tmp_path / "data").exists()
