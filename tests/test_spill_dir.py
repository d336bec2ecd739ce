"""Spill files and the output on real filesystems: the spill folder is checked before the first
UNet call (writable, not RAM-backed, room for the planned spill), short writes are completed, a
disk that fills up mid-run ends the run with a clear error (CLI exit 2) and leaves neither an
output file nor a spill file behind."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import tempfile

import pytest
import torch

from lib_hrlr.cli import main
from lib_hrlr.errors import DiskError
from lib_hrlr.image import spill as spill_mod
from lib_hrlr.image.spill import SPILL_HEADROOM, SpillArray, choose_spill_dir, filesystem_type
from lib_hrlr.pipeline.generate import generate
from lib_hrlr.pipeline.params import GenerationParams
from lib_hrlr.weights.random_checkpoint import cached_random_checkpoint

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny():
    return str(cached_random_checkpoint("tiny"))


@pytest.fixture(autouse=True)
def no_spill_env(monkeypatch):
    monkeypatch.delenv("HRLR_SPILL_DIR", raising=False)


@contextlib.contextmanager
def mounted(target, *mount_args):
    """``mount <args> <target>`` for the block, as root; skips the test where mounting is not allowed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test filesystem needs root")
    os.makedirs(target, exist_ok=True)
    r = subprocess.run(["mount", *mount_args, str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a test filesystem here: {r.stderr.strip()}")
    try:
        yield str(target)
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextlib.contextmanager
def small_disk(tmp_path, size_mb):
    """A loop-mounted ext4 filesystem of ``size_mb`` (a disk, not RAM)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size_mb * MiB)
    r = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mkfs.ext4 unavailable: {r.stderr.strip()}")
    with mounted(tmp_path / "disk", "-o", "loop", str(image)) as d:
        os.rmdir(os.path.join(d, "lost+found"))
        yield d


@contextlib.contextmanager
def read_only_folder(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        os.chmod(d, 0o555)
        try:
            yield str(d)
        finally:
            os.chmod(d, 0o755)
        return
    with mounted(d, "--bind", str(d)):  # root ignores permissions: a read-only bind mount
        r = subprocess.run(["mount", "-o", "remount,ro,bind", str(d)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
        yield str(d)


def params(tiny, tmp_path, **kw):
    base = dict(prompt="a lighthouse", width=256, height=192, model=tiny, steps=2, seed=3, budget_mb=8000,
                out=str(tmp_path / "out.png"), device="cpu", dtype="fp32")
    base.update(kw)
    return GenerationParams(**base)


def run(p):
    """generate(p) -> (result or error, stages seen)"""
    stages = []
    try:
        result = generate(p, progress=lambda ev: stages.append(ev.stage) if not stages or stages[-1] != ev.stage else None)
    except DiskError as e:
        return e, stages
    return result, stages


# ------------------------------------------------------------------------------- the array


def test_short_writes_are_completed(monkeypatch, tmp_path):
    real = os.pwrite
    sizes = []

    def short(fd, data, offset):  # the kernel may write less than asked
        sizes.append(len(data))
        return real(fd, bytes(memoryview(data)[:7]), offset)

    monkeypatch.setattr(spill_mod.os, "pwrite", short)
    full = torch.arange(5 * 9 * 11, dtype=torch.float32).reshape(5, 9, 11)
    with SpillArray(9, 11, 5, directory=str(tmp_path)) as arr:
        arr.write(0, 0, full)  # whole rows: one logical write of 1980 bytes
        arr.write(2, 3, full[:, :4, :6] * 2)  # a rectangle: 4 row writes of 120 bytes
        monkeypatch.setattr(spill_mod.os, "pwrite", real)
        want = full.clone()
        want[:, 2:6, 3:9] = full[:, :4, :6] * 2
        assert torch.equal(arr.to_tensor()[0], want)
    assert len(sizes) > 1980 // 7 and max(sizes) == 1980


def test_a_write_that_makes_no_progress_or_finds_the_disk_full_is_an_error(monkeypatch, tmp_path):
    for failure in (lambda fd, data, off: 0, lambda fd, data, off: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space"))):
        monkeypatch.setattr(spill_mod.os, "pwrite", failure)
        with SpillArray(4, 4, 1, directory=str(tmp_path)) as arr:
            with pytest.raises(DiskError) as e:
                arr.write(0, 0, torch.ones(1, 4, 4))
        assert e.value.field == "spill_dir" and "the disk is full" in e.value.message
        assert "--spill-dir" in e.value.message and os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------- the folder


def test_room_is_checked_against_the_planned_spill(tmp_path):
    place = choose_spill_dir(str(tmp_path), 10 * MiB)
    assert place.path == str(tmp_path) and place.chosen and place.warning is None
    assert place.free_bytes > 10 * MiB and place.filesystem != "unknown"
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(DiskError) as e:
        choose_spill_dir(str(tmp_path), free)  # more than is free once the headroom is kept
    msg = e.value.message
    assert e.value.field == "spill_dir" and "--spill-dir" in msg and f"({free} bytes)" in msg and "free" in msg
    with pytest.raises(DiskError) as e:
        choose_spill_dir(str(tmp_path / "missing"), MiB)
    assert "not an existing folder" in e.value.message


def test_small_filesystem_read_only_and_tmpfs_folders_are_refused(tmp_path):
    with small_disk(tmp_path, 16) as d:
        with pytest.raises(DiskError) as e:
            choose_spill_dir(d, 20 * MiB)
        assert "--spill-dir" in e.value.message and f"({20 * MiB} bytes)" in e.value.message
        assert os.listdir(d) == []
    with read_only_folder(tmp_path) as ro:
        with pytest.raises(DiskError) as e:
            choose_spill_dir(ro, MiB)
        assert "cannot write to" in e.value.message and "--spill-dir" in e.value.message
        assert os.listdir(ro) == []
    with mounted(tmp_path / "ram", "-t", "tmpfs", "-o", "size=64m", "tmpfs") as ram:
        assert filesystem_type(ram) == "tmpfs"
        with pytest.raises(DiskError) as e:
            choose_spill_dir(ram, MiB)
        assert "on tmpfs, which keeps files in RAM" in e.value.message and f"({MiB} bytes)" in e.value.message
        assert os.listdir(ram) == []


def test_a_ram_backed_temp_folder_is_replaced_by_the_user_cache(tmp_path, monkeypatch):
    with mounted(tmp_path / "ram", "-t", "tmpfs", "-o", "size=8m", "tmpfs") as ram:
        monkeypatch.setattr(tempfile, "tempdir", ram)
        monkeypatch.setenv("HRLR_CACHE", str(tmp_path / "cache"))
        place = choose_spill_dir(None, MiB)
        assert place.path == str(tmp_path / "cache" / "spill") and not place.chosen
        assert f"the temp folder {ram} is on tmpfs (RAM)" in place.warning and "--spill-dir" in place.warning
        monkeypatch.setenv("HRLR_SPILL_DIR", ram)  # named by the user (environment): refused, not replaced
        with pytest.raises(DiskError) as e:
            choose_spill_dir(None, MiB)
        assert "$HRLR_SPILL_DIR" in e.value.message


# ------------------------------------------------------------------------------- whole runs


def test_run_refuses_a_read_only_spill_folder_before_the_first_unet_call(tiny, tmp_path):
    with read_only_folder(tmp_path) as ro:
        err, stages = run(params(tiny, tmp_path, spill_dir=ro))
        assert isinstance(err, DiskError) and err.field == "spill_dir"
        assert "--spill-dir" in err.message and "bytes) of temporary files" in err.message
        assert stages == []  # not even the text encoder ran
        assert os.listdir(ro) == [] and not (tmp_path / "out.png").exists()


def test_run_refuses_a_missing_or_read_only_output_folder_at_validation(tiny, tmp_path):
    err, stages = run(params(tiny, tmp_path, out=str(tmp_path / "nope" / "x.png")))
    assert isinstance(err, DiskError) and err.field == "out" and "does not exist" in err.message and stages == []
    with read_only_folder(tmp_path) as ro:
        err, stages = run(params(tiny, tmp_path, out=os.path.join(ro, "x.png")))
        assert isinstance(err, DiskError) and err.field == "out" and "cannot write" in err.message and stages == []


def test_report_shows_the_spill_next_to_the_rss(tiny, tmp_path, capsys):
    report = tmp_path / "r.json"
    code = main(["generate", "--quiet", "--model", tiny, "--prompt", "x", "--width", "256", "--height", "192",
                 "--steps", "2", "--budget-mb", "8000", "--dtype", "fp32", "--spill-dir", str(tmp_path),
                 "--out", str(tmp_path / "o.png"), "--report", str(report)])
    err = capsys.readouterr().err
    assert code == 0, err
    from lib_hrlr.config.architectures import TINY
    from lib_hrlr.pipeline.disk import estimate_run_spill_bytes

    want = estimate_run_spill_bytes(params(tiny, tmp_path), TINY, torch.float32)
    rep = json.loads(report.read_text())
    assert rep["memory"]["spill_mb"] == round(want / MiB, 1) and rep["memory"]["spill_dir"] == str(tmp_path)
    assert rep["stats"]["spill"]["planned_bytes"] == want
    line = next(l for l in err.splitlines() if l.startswith("spill files on disk (not RSS)"))
    assert f"{want / MiB:.1f}" in line and str(tmp_path) in line
    assert sorted(os.listdir(tmp_path)) == ["o.png", "r.json"]  # no spill file left


def test_disk_full_mid_run_exits_2_and_leaves_nothing(tiny, tmp_path, capsys, monkeypatch):
    """An injected ENOSPC on every spill write (the first is the base decode, after the base UNet
    pass): exit 2, a message naming --spill-dir, no PNG, no spill file."""
    spill = tmp_path / "spill"
    spill.mkdir()

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spill_mod.os, "pwrite", full)
    code = main(["generate", "--quiet", "--model", tiny, "--prompt", "x", "--width", "256", "--height", "192",
                 "--steps", "2", "--budget-mb", "8000", "--spill-dir", str(spill), "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: spill_dir: writing a spill file in" in err and "the disk is full" in err and "--spill-dir" in err
    assert os.listdir(spill) == [] and sorted(os.listdir(tmp_path)) == ["spill"]


def test_a_real_disk_filling_up_during_the_final_decode(tiny, tmp_path):
    """A loop-mounted 128 MB ext4 spill folder passes the check; when the final decode starts,
    another writer takes all but 64 KiB: the run fails with the disk-full error and leaves no
    spill file and no output."""
    with small_disk(tmp_path, 128) as d:
        filler = os.path.join(d, "other-program.bin")

        def fill(ev):
            if ev.stage == "decode" and not os.path.exists(filler):
                st = os.statvfs(d)
                with open(filler, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, st.f_bavail * st.f_frsize - 64 * 1024)

        with pytest.raises(DiskError) as e:
            generate(params(tiny, tmp_path, spill_dir=d), progress=fill)
        assert e.value.field == "spill_dir" and "the disk is full" in e.value.message
        assert os.listdir(d) == ["other-program.bin"]
        assert not (tmp_path / "out.png").exists()
    assert SPILL_HEADROOM == 64 * MiB


def test_an_init_image_is_not_spilled_before_the_spill_folder_is_checked(tiny, tmp_path):
    """The user's image is decoded into spill files: a read-only (or RAM-backed) spill folder is
    refused before it is read, through the pipeline and through the API's batch path."""
    import numpy as np
    from PIL import Image

    from lib_hrlr import upscale

    src = tmp_path / "in.png"
    Image.fromarray(np.full((96, 128, 3), 200, np.uint8)).save(src)
    with read_only_folder(tmp_path) as ro:
        err, stages = run(params(tiny, tmp_path, init_image=str(src), strength=0.3, spill_dir=ro))
        assert isinstance(err, DiskError) and err.field == "spill_dir" and stages == []
        with pytest.raises(DiskError) as e:
            upscale(str(src), model=tiny, prompt="x", steps=2, dtype="fp32", budget_mb=8000, spill_dir=ro,
                    out=str(tmp_path / "up.png"))
        assert e.value.field == "spill_dir"
        assert os.listdir(ro) == [] and not (tmp_path / "up.png").exists() and not (tmp_path / "out.png").exists()
    # the planned spill counts the image: decoded and resized, uint8 RGB at the target size
    from lib_hrlr.config.architectures import TINY
    from lib_hrlr.pipeline.disk import estimate_run_spill_bytes, init_image_spill_bytes

    p = params(tiny, tmp_path, init_image=str(src), strength=0.3)
    assert init_image_spill_bytes(p) == 2 * 256 * 192 * 3
    assert estimate_run_spill_bytes(p, TINY, torch.float32) == (
        estimate_run_spill_bytes(params(tiny, tmp_path), TINY, torch.float32) + 2 * 256 * 192 * 3)
