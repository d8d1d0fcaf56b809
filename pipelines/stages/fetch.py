"""Fetch stage: obtain the PASCAL VOC 2012 and SBD archives, verify them, extract them.

    python -m pipelines.stages.fetch [--params params.yaml] [--local-dir DIR] [--verify]     (or `fcn fetch`)

For each archive (data.voc, data.sbd): reused from data.download_dir when its md5
matches (the md5 recorded beside it while its size and mtime are unchanged; --verify
hashes it again), else copied from data.local_dir (or --local-dir), else downloaded from its
mirrors, resumably, and used only once its md5 matches (pipelines/data/download.py). Both
are then extracted safely into data.raw_dir, links, devices and paths leaving the
target refused, a marker recording the whole tree (pipelines/data/archives.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from pipelines.core.exits import run_main
from pipelines.core.params import DataParams, load_params
from pipelines.data.archives import safe_extract
from pipelines.data.download import FetchError, fetch_archive

# The tree each archive must hold, below data.raw_dir.
EXPECTED_TREE = {"voc": "VOCdevkit/VOC2012", "sbd": "benchmark_RELEASE/dataset"}


def fetch_all(data: DataParams, verify: bool = False) -> dict:
    """Fetch and extract both archives (paths in `data` as load_params resolved them); verify:
    hash reused archives again.

    Returns {"voc": {"archive": Path, "extracted": [Path, ...], "tree": Path}, "sbd": {...}}.
    """
    download_dir, raw_dir, local_dir = Path(data.download_dir), Path(data.raw_dir), data.local_dir
    result = {}
    for key in ("voc", "sbd"):
        archive = fetch_archive(getattr(data, key), download_dir, local_dir=local_dir,
                                timeout_s=data.timeout_s, retries=data.retries, verify=verify)
        result[key] = {"archive": archive}
    for key, entry in result.items():
        entry["extracted"] = safe_extract(entry["archive"], raw_dir)
        entry["tree"] = raw_dir / EXPECTED_TREE[key]
        if not entry["tree"].is_dir():
            raise FetchError(f"{entry['archive']} does not contain {EXPECTED_TREE[key]}/ (found "
                             f"{', '.join(p.name for p in entry['extracted'])}); is data.{key}.filename "
                             f"the right archive?")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fcn fetch", description="Download, verify and extract VOC2012 and SBD.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    parser.add_argument("--local-dir", help="directory or file:// URL holding the archives (overrides data.local_dir)")
    parser.add_argument("--verify", action="store_true",
                        help="hash archives already in data.download_dir again instead of trusting the md5 recorded "
                             "beside them at their size and modification time")
    args = parser.parse_args(argv)

    def body():
        data = load_params(args.params).data
        if args.local_dir is not None:
            local = args.local_dir if args.local_dir.startswith("file:") else str(Path(args.local_dir).resolve())
            data = dataclasses.replace(data, local_dir=local)
        for key, entry in fetch_all(data, verify=args.verify).items():
            print(f"{key}: {entry['archive']} (md5 ok) -> {entry['tree']}")

    return run_main("fetch", body, resume="run again to resume the download")


if __name__ == "__main__":
    sys.exit(main())
