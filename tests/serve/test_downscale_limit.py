"""`fcn predict --downscale` is bounded: an image past downscale_limit(inference.max_pixels) is
refused from its header, so a small file of very many pixels costs no memory.

The memory bound is an address-space limit on the `fcn predict` process: what importing
the command takes, plus a margin that reading and blending the whole image would pass.
"""
import os
import resource
import subprocess
import sys

import numpy as np
import yaml
from PIL import Image

from fcn_models.limits import DOWNSCALE_FACTOR, downscale_limit
from support.checkpoints import make_checkpoint

MARGIN = 1536 * 2**20
ENV = {"OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}


def imported_size() -> int:
    """Peak address space of a Python that has imported what `fcn predict` imports."""
    out = subprocess.run([sys.executable, "-c", "import pipelines.commands.predict, torch, numpy; "
                          "print(open('/proc/self/status').read().split('VmPeak:')[1].split()[0])"],
                         capture_output=True, text=True, check=True, env={**os.environ, **ENV}, timeout=300)
    return int(out.stdout.strip()) * 1024


def test_downscale_refuses_past_its_own_limit_within_bounded_memory(tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=3, mean_iu=0.5)
    limit = 256 * 256
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"inference": {"max_pixels": limit}}))
    # 9000 x 9000 of one colour: a PNG of a few hundred KB, 243 MB of pixels.
    Image.fromarray(np.full((9000, 9000, 3), 90, np.uint8)).save(tmp_path / "huge.png")
    address_space = imported_size() + MARGIN

    def bounded():
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    result = subprocess.run(
        [sys.executable, "-m", "pipelines.commands.predict", str(tmp_path / "huge.png"), "--downscale",
         "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, env={**os.environ, **ENV}, preexec_fn=bounded, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    line = result.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("predict: ")
    assert "9000x9000 is 81.0 megapixels" in line
    assert f"{downscale_limit(limit)} pixels" in line and f"{DOWNSCALE_FACTOR} x inference.max_pixels" in line
    assert not (tmp_path / "out" / "huge_mask.png").exists()


def test_downscale_predicts_an_image_within_its_limit(tmp_path):
    make_checkpoint(tmp_path / "ckpt", seed=3, mean_iu=0.5)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"inference": {"max_pixels": 400}}))
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.commands.predict", str(tmp_path / "a.png"), "--downscale",
         "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out"), "--params", str(tmp_path / "params.yaml")],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert np.asarray(Image.open(tmp_path / "out" / "a_mask.png")).shape == (50, 60)
