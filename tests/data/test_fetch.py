"""The fetch stage (pipelines.data.download, pipelines.data.archives, pipelines.stages.fetch) against a Range-capable HTTP server on 127.0.0.1 and small archives built here."""
import dataclasses
import hashlib
import io
import os
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pipelines.core.params import ArchiveParams, DataParams, parse_params
from pipelines.data.md5_record import recorded_md5
from pipelines.data import archives, download
from pipelines.stages import fetch as fetch_stage

# ---------------------------------------------------------------------------------------
# A file server that honours (or ignores) Range and can break a transfer off mid-way


class ArchiveServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files = {}           # URL path -> bytes
        self.drop_after = {}      # URL path -> bytes to send before closing, on the next request only
        self.ignore_range = False
        self.fail_next = {}       # URL path -> HTTP statuses to answer with before serving the file
        self.requests = []        # (path, Range header or None), in arrival order

    def url(self, path):
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class RangeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        rng = self.headers.get("Range")
        server.requests.append((self.path, rng))
        body = server.files.get(self.path)
        if server.fail_next.get(self.path):
            self.send_error(server.fail_next[self.path].pop(0))
            return
        if body is None:
            self.send_error(404)
            return
        start, status = 0, 200
        if rng and not server.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        payload = body[start:]
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = server.drop_after.pop(self.path, None)
        if cut is not None:
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    srv = ArchiveServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


# ---------------------------------------------------------------------------------------
# Archives


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _tar_bytes(files: dict, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, content in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            info.mtime = 1_300_000_000
            tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _voc_files(n=3, seed=1):
    rng = __import__("random").Random(seed)
    ids = [f"2008_{i:06d}" for i in range(n)]
    files = {f"VOCdevkit/VOC2012/JPEGImages/{i}.jpg": rng.randbytes(40_000) for i in ids}
    files.update({f"VOCdevkit/VOC2012/SegmentationClass/{i}.png": rng.randbytes(3_000) for i in ids})
    files["VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"] = "\n".join(ids).encode() + b"\n"
    return files


def _sbd_files(n=3, seed=2):
    rng = __import__("random").Random(seed)
    ids = [f"2009_{i:06d}" for i in range(n)]
    files = {f"benchmark_RELEASE/dataset/img/{i}.jpg": rng.randbytes(40_000) for i in ids}
    files.update({f"benchmark_RELEASE/dataset/cls/{i}.mat": rng.randbytes(2_000) for i in ids})
    files["benchmark_RELEASE/dataset/train.txt"] = "\n".join(ids).encode() + b"\n"
    return files


@pytest.fixture(scope="module")
def voc_tar():
    return _tar_bytes(_voc_files())


@pytest.fixture(scope="module")
def sbd_tgz():
    return _tar_bytes(_sbd_files(), mode="w:gz")


def _spec(body: bytes, *mirrors, filename="VOCtrainval_11-May-2012.tar") -> ArchiveParams:
    return ArchiveParams(filename=filename, md5=_md5(body), mirrors=list(mirrors))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------
# Download


def test_full_download_is_verified_and_recorded(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "dl" / "VOCtrainval_11-May-2012.tar"
    out = download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert out == dest
    assert dest.read_bytes() == voc_tar
    assert not dest.with_name(dest.name + ".part").exists()
    assert server.requests == [("/voc.tar", None)]
    assert recorded_md5(dest) == _md5(voc_tar)


def test_interrupted_transfer_resumes_with_range(server, voc_tar, tmp_path):
    cut = 50_000
    server.files["/voc.tar"] = voc_tar
    server.drop_after["/voc.tar"] = cut
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=2)
    assert server.requests == [("/voc.tar", None), ("/voc.tar", f"bytes={cut}-")]
    assert _md5(dest.read_bytes()) == _md5(voc_tar)
    assert not dest.with_name(dest.name + ".part").exists()


def test_broken_transfer_keeps_part_and_next_run_resumes(server, voc_tar, tmp_path):
    cut = 30_000
    server.files["/voc.tar"] = voc_tar
    server.drop_after["/voc.tar"] = cut
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    part = dest.with_name(dest.name + ".part")
    with pytest.raises(download.FetchError, match="gave up after 1 attempts") as err:
        download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert str(part) in str(err.value)
    assert part.stat().st_size == cut
    assert not dest.exists()
    download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert server.requests[-1] == ("/voc.tar", f"bytes={cut}-")
    assert dest.read_bytes() == voc_tar


def test_server_ignoring_range_restarts_cleanly(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    server.ignore_range = True
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(voc_tar[:20_000])
    download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert server.requests == [("/voc.tar", "bytes=20000-")]
    assert dest.read_bytes() == voc_tar
    assert not part.exists()


def test_416_with_complete_part_is_accepted_and_oversized_part_restarts(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    part = dest.with_name(dest.name + ".part")
    part.write_bytes(voc_tar)
    download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert server.requests == [("/voc.tar", f"bytes={len(voc_tar)}-")]
    assert dest.read_bytes() == voc_tar

    dest.unlink()
    part.write_bytes(voc_tar + b"stale tail")
    download.download(server.url("/voc.tar"), dest, _md5(voc_tar), timeout_s=5, retries=0)
    assert server.requests[1:] == [("/voc.tar", f"bytes={len(voc_tar) + 10}-"), ("/voc.tar", None)]
    assert dest.read_bytes() == voc_tar


def test_wrong_checksum_is_rejected_and_nothing_is_left(server, voc_tar, tmp_path):
    corrupted = bytearray(voc_tar)
    corrupted[1000] ^= 0xFF
    server.files["/voc.tar"] = bytes(corrupted)
    url = server.url("/voc.tar")
    dest = tmp_path / "VOCtrainval_11-May-2012.tar"
    with pytest.raises(download.ChecksumError) as err:
        download.download(url, dest, _md5(voc_tar), timeout_s=5, retries=0)
    message = str(err.value)
    for needed in (dest.name, url, _md5(voc_tar), _md5(bytes(corrupted))):
        assert needed in message
    assert sorted(os.listdir(tmp_path)) == []

    # Through fetch_archive the same facts reach the final error, and nothing is trusted later.
    with pytest.raises(download.FetchError) as err:
        download.fetch_archive(_spec(voc_tar, url), tmp_path, timeout_s=5, retries=0)
    for needed in (dest.name, url, _md5(voc_tar), _md5(bytes(corrupted))):
        assert needed in str(err.value)
    assert sorted(os.listdir(tmp_path)) == []


def test_falls_back_to_second_mirror_when_first_404s(server, voc_tar, tmp_path):
    server.files["/good/voc.tar"] = voc_tar
    spec = _spec(voc_tar, server.url("/gone/voc.tar"), server.url("/good/voc.tar"))
    out = download.fetch_archive(spec, tmp_path / "dl", timeout_s=5, retries=3)
    assert out.read_bytes() == voc_tar
    # A 404 is not retried: one request to the first mirror, then the second.
    assert server.requests == [("/gone/voc.tar", None), ("/good/voc.tar", None)]


def test_server_error_is_retried_with_backoff(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    server.fail_next["/voc.tar"] = [503]
    out = download.fetch_archive(_spec(voc_tar, server.url("/voc.tar")), tmp_path, timeout_s=5, retries=1)
    assert out.read_bytes() == voc_tar
    assert server.requests == [("/voc.tar", None), ("/voc.tar", None)]

    # Out of retries, the 5xx is reported and nothing is left behind.
    server.fail_next["/voc.tar"] = [500]
    out.unlink()
    with pytest.raises(download.FetchError, match="HTTP 500") as err:
        download.fetch_archive(_spec(voc_tar, server.url("/voc.tar")), tmp_path, timeout_s=5, retries=0)
    assert "gave up after 1 attempts" in str(err.value)
    assert os.listdir(tmp_path) == []


def test_existing_archive_is_reused_and_a_bad_one_replaced(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    spec = _spec(voc_tar, server.url("/voc.tar"))
    out = download.fetch_archive(spec, tmp_path, timeout_s=5, retries=0)
    mtime = out.stat().st_mtime_ns
    assert download.fetch_archive(spec, tmp_path, timeout_s=5, retries=0) == out
    assert len(server.requests) == 1
    assert out.stat().st_mtime_ns == mtime

    out.write_bytes(b"not the archive")
    download.fetch_archive(spec, tmp_path, timeout_s=5, retries=0)
    assert len(server.requests) == 2
    assert out.read_bytes() == voc_tar


def test_local_dir_as_directory_and_as_file_url(server, voc_tar, tmp_path):
    local = tmp_path / "local archives"
    local.mkdir()
    (local / "VOCtrainval_11-May-2012.tar").write_bytes(voc_tar)
    spec = _spec(voc_tar, server.url("/voc.tar"))  # the server has no file: any request would fail
    for i, where in enumerate([local, local.as_uri()]):
        out = download.fetch_archive(spec, tmp_path / f"dl{i}", local_dir=where, timeout_s=5, retries=0)
        assert out == tmp_path / f"dl{i}" / "VOCtrainval_11-May-2012.tar"
        assert out.read_bytes() == voc_tar
    assert server.requests == []


def test_local_file_with_wrong_md5_is_an_error_and_never_used(server, voc_tar, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    (local / "VOCtrainval_11-May-2012.tar").write_bytes(b"something else")
    server.files["/voc.tar"] = voc_tar
    spec = _spec(voc_tar, server.url("/voc.tar"))
    with pytest.raises(download.ChecksumError) as err:
        download.fetch_archive(spec, tmp_path / "dl", local_dir=local, timeout_s=5, retries=0)
    message = str(err.value)
    for needed in (str(local / "VOCtrainval_11-May-2012.tar"), _md5(voc_tar), _md5(b"something else")):
        assert needed in message
    assert os.listdir(tmp_path / "dl") == []
    assert server.requests == []


def test_local_dir_without_the_file_falls_back_to_mirror(server, voc_tar, tmp_path):
    server.files["/voc.tar"] = voc_tar
    empty = tmp_path / "empty"
    empty.mkdir()
    out = download.fetch_archive(_spec(voc_tar, server.url("/voc.tar")), tmp_path / "dl", local_dir=empty,
                              timeout_s=5, retries=0)
    assert out.read_bytes() == voc_tar
    with pytest.raises(download.FetchError, match="not a directory"):
        download.fetch_archive(_spec(voc_tar), tmp_path / "dl2", local_dir=tmp_path / "missing")


def test_no_network_fails_fast_with_guidance(tmp_path):
    spec = ArchiveParams(
        filename="VOCtrainval_11-May-2012.tar", md5="6cd6e144f989b92b3379bac3b3de84fd",
        mirrors=["http://nonexistent.invalid/VOCtrainval_11-May-2012.tar",
                 f"http://127.0.0.1:{_closed_port()}/VOCtrainval_11-May-2012.tar"],
    )
    started = time.monotonic()
    with pytest.raises(download.FetchError) as err:
        download.fetch_archive(spec, tmp_path, timeout_s=30, retries=3)
    assert time.monotonic() - started < 20
    message = str(err.value)
    for needed in ("nonexistent.invalid", "127.0.0.1", "data.local_dir", "--local-dir", "fcn demo-data"):
        assert needed in message
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# Extraction


def _malicious_tar(path: Path, bad: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w") as tar:
        good = tarfile.TarInfo("VOCdevkit/ok.txt")
        good.size = 2
        tar.addfile(good, io.BytesIO(b"ok"))
        tar.addfile(bad, io.BytesIO(b"evil") if bad.isreg() else None)


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    info.size = 4 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize("bad, why", [
    (_member("../evil"), "'..'"),
    (_member("VOCdevkit/../../evil"), "'..'"),
    (_member("/tmp/fcn-fetch-test-evil"), "absolute"),
    (_member("VOCdevkit/link", tarfile.SYMTYPE, "../../evil"), "symbolic link"),
    (_member("VOCdevkit/inside-link", tarfile.SYMTYPE, "ok.txt"), "symbolic link"),
    (_member("VOCdevkit/hard", tarfile.LNKTYPE, "VOCdevkit/ok.txt"), "hard link"),
    (_member("VOCdevkit/fifo", tarfile.FIFOTYPE), "FIFO"),
    (_member("VOCdevkit/null", tarfile.CHRTYPE), "device"),
    (_member("VOCdevkit/disk", tarfile.BLKTYPE), "device"),
])
def test_malicious_members_are_refused(tmp_path, bad, why):
    archive = tmp_path / "bad.tar"
    _malicious_tar(archive, bad)
    target = tmp_path / "raw"
    with pytest.raises(archives.UnsafeArchiveError) as err:
        archives.safe_extract(archive, target)
    assert bad.name in str(err.value) and why in str(err.value) and str(archive) in str(err.value)
    # Nothing landed anywhere: not in the target (not even the good member), not beside it.
    assert os.listdir(target) == []
    assert sorted(os.listdir(tmp_path)) == ["bad.tar", "bad.tar.md5.json", "raw"]
    assert not Path("/tmp/fcn-fetch-test-evil").exists()


def test_extract_then_skip_then_reextract_after_deletion(voc_tar, tmp_path):
    archive = tmp_path / "VOCtrainval_11-May-2012.tar"
    archive.write_bytes(voc_tar)
    target = tmp_path / "raw"
    top = archives.safe_extract(archive, target)
    assert top == [target / "VOCdevkit"]
    for name, content in _voc_files().items():
        assert (target / name).read_bytes() == content
    assert archives.is_extracted(archive, target)
    assert [p.name for p in target.iterdir() if p.name.startswith(".extract-")] == []

    files = sorted(p for p in target.rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    assert archives.safe_extract(archive, target) == top
    assert {p: p.stat().st_mtime_ns for p in sorted(target.rglob("*"))} == before

    victim = target / "VOCdevkit/VOC2012/JPEGImages/2008_000001.jpg"
    victim.unlink()
    stray = target / "VOCdevkit/stray.txt"
    stray.write_text("left from an older tree")
    assert not archives.is_extracted(archive, target)
    archives.safe_extract(archive, target)
    assert victim.read_bytes() == _voc_files()[str(victim.relative_to(target))]
    assert not stray.exists()  # the top-level directory was replaced as a whole
    assert archives.is_extracted(archive, target)


def test_changed_file_size_triggers_reextraction(sbd_tgz, tmp_path):
    archive = tmp_path / "benchmark.tgz"
    archive.write_bytes(sbd_tgz)
    target = tmp_path / "raw"
    assert archives.safe_extract(archive, target) == [target / "benchmark_RELEASE"]
    train = target / "benchmark_RELEASE/dataset/train.txt"
    train.write_text("truncated")
    assert not archives.is_extracted(archive, target)
    archives.safe_extract(archive, target)
    assert train.read_bytes() == _sbd_files()["benchmark_RELEASE/dataset/train.txt"]


def test_corrupt_archive_is_a_clear_error(tmp_path):
    archive = tmp_path / "benchmark.tgz"
    archive.write_bytes(b"\x1f\x8b" + os.urandom(500))
    with pytest.raises(download.FetchError, match="benchmark.tgz: cannot be read as a tar archive"):
        archives.safe_extract(archive, tmp_path / "raw")
    assert os.listdir(tmp_path / "raw") == []


# ---------------------------------------------------------------------------------------
# The stage


def _write_params(path: Path, **data) -> Path:
    import yaml
    path.write_text(yaml.safe_dump({"data": data}))
    return path


def _resolved(data: DataParams, root):
    """The data section as load_params gives it for a params file in root: paths made absolute."""
    return parse_params({"data": dataclasses.asdict(data)}, root=root).data


def test_fetch_all_over_http(server, voc_tar, sbd_tgz, tmp_path):
    server.files["/mirror/VOCtrainval_11-May-2012.tar"] = voc_tar
    server.files["/mirror/benchmark.tgz"] = sbd_tgz
    data = DataParams(
        voc=_spec(voc_tar, "http://nonexistent.invalid/voc.tar", server.url("/mirror/VOCtrainval_11-May-2012.tar")),
        sbd=_spec(sbd_tgz, server.url("/mirror/benchmark.tgz"), filename="benchmark.tgz"),
        timeout_s=5, retries=1,
    )
    result = fetch_stage.fetch_all(_resolved(data, tmp_path))
    assert result["voc"]["archive"] == tmp_path / "data/downloads/VOCtrainval_11-May-2012.tar"
    assert result["sbd"]["tree"] == tmp_path / "data/raw/benchmark_RELEASE/dataset"
    assert (tmp_path / "data/raw/VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").is_file()
    assert sorted((tmp_path / "data/raw/benchmark_RELEASE/dataset/img").iterdir())[0].stat().st_size == 40_000


def test_fetch_all_serves_the_generated_mirror(server, tmp_path):
    from pipelines.data.synthetic import write_mirror

    mirror = write_mirror(tmp_path / "mirror", n_train=4, n_val=3, max_side=64, workers=1)
    for key in ("voc", "sbd"):
        server.files[f"/{mirror[key].name}"] = mirror[key].read_bytes()
    server.drop_after["/benchmark.tgz"] = 10_000  # the SBD transfer breaks once and resumes
    data = DataParams(
        voc=ArchiveParams(filename=mirror["voc"].name, md5=mirror["md5"]["voc"],
                          mirrors=[server.url(f"/{mirror['voc'].name}")]),
        sbd=ArchiveParams(filename=mirror["sbd"].name, md5=mirror["md5"]["sbd"],
                          mirrors=[server.url(f"/{mirror['sbd'].name}")]),
        timeout_s=5, retries=2,
    )
    result = fetch_stage.fetch_all(_resolved(data, tmp_path))
    assert ("/benchmark.tgz", "bytes=10000-") in server.requests
    with tarfile.open(mirror["voc"]) as tar:
        expected = {m.name: m.size for m in tar if m.isreg()}
    for name, size in expected.items():
        assert (tmp_path / "data/raw" / name).stat().st_size == size
    val = (result["voc"]["tree"] / "ImageSets/Segmentation/val.txt").read_text().split()
    assert len(val) >= 3 and all((result["voc"]["tree"] / f"JPEGImages/{i}.jpg").is_file() for i in val)
    train = (result["sbd"]["tree"] / "train.txt").read_text().split()
    assert len(train) == 4 and all((result["sbd"]["tree"] / f"cls/{i}.mat").is_file() for i in train)


def test_fetch_all_rejects_archive_without_expected_tree(voc_tar, tmp_path):
    local = tmp_path / "local"
    local.mkdir()
    wrong = _tar_bytes({"something/else.txt": b"x"}, mode="w:gz")
    (local / "VOCtrainval_11-May-2012.tar").write_bytes(voc_tar)
    (local / "benchmark.tgz").write_bytes(wrong)
    data = DataParams(local_dir=str(local), voc=_spec(voc_tar),
                      sbd=_spec(wrong, filename="benchmark.tgz"))
    with pytest.raises(download.FetchError, match="does not contain benchmark_RELEASE/dataset"):
        fetch_stage.fetch_all(_resolved(data, tmp_path))


def test_main_with_local_dir_and_offline_failure(voc_tar, sbd_tgz, tmp_path, capsys):
    local = tmp_path / "archives"
    local.mkdir()
    (local / "VOCtrainval_11-May-2012.tar").write_bytes(voc_tar)
    (local / "benchmark.tgz").write_bytes(sbd_tgz)
    offline = ["http://nonexistent.invalid/x"]
    params = _write_params(
        tmp_path / "params.yaml",
        voc={"filename": "VOCtrainval_11-May-2012.tar", "md5": _md5(voc_tar), "mirrors": offline},
        sbd={"filename": "benchmark.tgz", "md5": _md5(sbd_tgz), "mirrors": offline},
    )
    # Offline and no local archives: non-zero exit, one clear message, no traceback.
    assert fetch_stage.main(["--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "fetch: could not obtain VOCtrainval_11-May-2012.tar" in err and "--local-dir" in err
    assert "Traceback" not in err

    from pipelines import cli
    assert cli.main(["fetch", "--params", str(params), "--local-dir", str(local)]) == 0
    out = capsys.readouterr().out
    assert f"voc: {tmp_path / 'data/downloads/VOCtrainval_11-May-2012.tar'} (md5 ok)" in out
    assert (tmp_path / "data/raw/VOCdevkit/VOC2012/JPEGImages/2008_000000.jpg").is_file()

    # Second run: nothing copied or extracted again.
    assert fetch_stage.main(["--params", str(params), "--local-dir", local.as_uri()]) == 0
    out = capsys.readouterr().out
    assert "reusing" in out and "already extracted" in out and "copying" not in out


def test_main_reports_bad_params(tmp_path, capsys):
    params = _write_params(tmp_path / "params.yaml", retries=-1)
    assert fetch_stage.main(["--params", str(params)]) == 2
    err = capsys.readouterr().err
    assert "data.retries" in err and "Traceback" not in err


def test_a_reused_archive_is_trusted_on_size_and_mtime_and_verify_hashes_it_again(voc_tar, sbd_tgz, tmp_path,
                                                                                 capsys):
    local = tmp_path / "archives"
    local.mkdir()
    (local / "VOCtrainval_11-May-2012.tar").write_bytes(voc_tar)
    (local / "benchmark.tgz").write_bytes(sbd_tgz)
    offline = ["http://nonexistent.invalid/x"]
    params = _write_params(
        tmp_path / "params.yaml",
        voc={"filename": "VOCtrainval_11-May-2012.tar", "md5": _md5(voc_tar), "mirrors": offline},
        sbd={"filename": "benchmark.tgz", "md5": _md5(sbd_tgz), "mirrors": offline},
    )
    assert fetch_stage.main(["--params", str(params), "--local-dir", str(local)]) == 0
    # One byte changed in place, the size and modification time kept.
    cached = tmp_path / "data" / "downloads" / "VOCtrainval_11-May-2012.tar"
    stat = cached.stat()
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()

    # The trade-off docs/PIPELINE.md states: the record is trusted, as DVC trusts its cache.
    assert fetch_stage.main(["--params", str(params), "--local-dir", str(local)]) == 0
    assert f"fetch: reusing {cached} (md5 ok)" in capsys.readouterr().out
    assert cached.read_bytes() == bytes(data)

    # --verify hashes it again, finds it changed and fetches the archive anew.
    assert fetch_stage.main(["--params", str(params), "--local-dir", str(local), "--verify"]) == 0
    out = capsys.readouterr().out
    assert f"fetch: {cached} has md5 {_md5(bytes(data))}, expected {_md5(voc_tar)}; deleting it" in out
    assert f"fetch: copying {local / 'VOCtrainval_11-May-2012.tar'} -> {cached}" in out
    assert "fetch: reusing" in out and "(md5 verified)" in out  # the SBD archive, hashed again: unchanged
    assert cached.read_bytes() == voc_tar
