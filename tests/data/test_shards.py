"""The shard contract's one read of the shard bytes: md5 and sha1 of each file, kept while the file stays the same."""
import hashlib
import os
import time

from pipelines.data import shards


def age(path, seconds=3600):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_file_digests_are_the_md5_and_sha1_of_the_bytes(tmp_path):
    files = [tmp_path / "b.parquet", tmp_path / "a.parquet"]
    for i, path in enumerate(files):
        path.write_bytes(bytes(range(256)) * (i + 1) * 5000)
    digests = shards.file_digests(files)
    assert [d.path for d in digests] == files
    for path, digest in zip(files, digests):
        data = path.read_bytes()
        assert digest.md5 == hashlib.md5(data).hexdigest()
        assert digest.sha1 == hashlib.sha1(data).digest()
        assert digest.size == len(data)


def test_a_file_is_read_once_while_it_stays_the_same(tmp_path):
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(b"one")
    age(path)
    first, = shards.file_digests([path])
    assert shards.file_digests([path])[0] is first
    # Rewritten: other bytes, another mtime: hashed again.
    path.write_bytes(b"two")
    age(path, 1800)
    again, = shards.file_digests([path])
    assert again.md5 == hashlib.md5(b"two").hexdigest()


def test_a_file_written_just_now_is_hashed_every_time(tmp_path):
    # Its mtime could stay the same through another write within the clock's tick.
    path = tmp_path / "part-00000.parquet"
    path.write_bytes(b"fresh")
    first, = shards.file_digests([path])
    assert shards.file_digests([path])[0] is not first
