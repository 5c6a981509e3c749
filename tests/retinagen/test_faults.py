"""Faults: a training run killed mid-snapshot, an unwritable output folder, a full disk.

What must hold (issue 6, item 5):
  * SIGKILL while a checkpoint is being written, then ``retinagen train --resume RUN``: training
    resumes from the last complete checkpoint, finishes, and every checkpoint left loads with a
    matching sha256 (the weights equal an uninterrupted run's, bit for bit); no temporary is left.
  * An output folder the user may not write to: ``synth``, ``prepare`` and ``generate`` exit 2 with one
    ``error:`` line naming the path, and leave nothing behind.
  * A full disk (ENOSPC raised part-way through a write): a clear error naming the file, no partial
    or temporary files, and the previous version of the file intact.

The kill lands deterministically: a small driver script wraps one function of
``retinagen.training.checkpoint`` so the process SIGKILLs itself at an exact point of the snapshot
(after the tensor file is in place but before its JSON commit marker, or half-way through either
file), then runs the real ``retinagen train`` command line. No library code knows about the test.

Permissions: root ignores mode bits, so as root the permission tests run the command with the
effective uid of ``nobody`` (``os.seteuid``, restored afterwards) on folders that user owns.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

from retinagen.cli import main
from retinagen.fileio import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_write_with,
    storage_error_message,
)
from retinagen.training.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
)

REPO = Path(__file__).resolve().parents[2]
ENOSPC_TEXT = "no space left on the device"


def _enospc() -> OSError:
    """What a write() on a full disk raises: errno ENOSPC and no file name."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _temporaries(folder: Path) -> list[Path]:
    """Hidden temporaries of fileio (``.NAME.<random>.tmp``) and synth (``.NAME.partial-*``)."""
    return sorted(p for p in folder.rglob(".*") if p.name.endswith(".tmp") or ".partial-" in p.name)


def _snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file below ``folder``: to prove nothing changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------------------------------
# SIGKILL mid-snapshot, then resume

_DRIVER = textwrap.dedent(
    '''
    """Run `retinagen train ...` and SIGKILL this process at one exact point of one checkpoint write."""
    import json
    import os
    import signal
    import sys
    from pathlib import Path

    import retinagen.artifact as ck
    from retinagen.cli import main
    from retinagen.fileio import atomic_path

    mode, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    name = f"ckpt-{step:06d}"
    real_write_json, real_save_file = ck.atomic_write_json, ck.save_file


    def die():
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


    def write_json(target, obj, indent=2):
        if Path(target).stem == name:
            if mode == "after_tensors":  # the tensor file is complete and in place; no commit marker yet
                die()
            if mode == "mid_json":  # half of the JSON in its temporary file
                with atomic_path(target) as tmp:
                    text = json.dumps(obj)
                    tmp.write_text(text[: len(text) // 2])
                    die()
        real_write_json(target, obj, indent)


    def save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        if mode == "mid_tensors" and Path(filename).name.startswith(f".{name}."):
            with open(filename, "r+b") as fh:  # half of the tensor file in its temporary file
                fh.truncate(os.path.getsize(filename) // 2)
            die()


    ck.atomic_write_json, ck.save_file = write_json, save_file
    sys.exit(main(argv))
    '''
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """The killed run is a subprocess with one thread; the straight and resumed runs here must use one
    too, or their float reductions differ and "bit-identical after resume" compares different math."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def straight_run(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke run trained without interruption (8 steps, snapshots at steps 4 and 8)."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", "--preset", "smoke", "--data", str(synth_zip_16), "--out", str(run)]) == 0
    return run


def _kill_mid_snapshot(mode: str, data: Path, run: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    driver = tmp_path / "kill_driver.py"
    driver.write_text(_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    argv = ["train", "--preset", "smoke", "--data", str(data), "--out", str(run)]
    return subprocess.run(
        [sys.executable, str(driver), mode, "8", *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "mode",
    [
        "after_tensors",
        pytest.param("mid_tensors", marks=pytest.mark.slow),
        pytest.param("mid_json", marks=pytest.mark.slow),
    ],
)
def test_sigkill_mid_snapshot_then_resume(
    mode: str, synth_zip_16: Path, straight_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    ck_dir = run / "checkpoints"
    proc = _kill_mid_snapshot(mode, synth_zip_16, run, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]

    # The kill landed inside the step-8 snapshot: step 4 is the last complete checkpoint.
    assert not (ck_dir / "ckpt-000008.json").exists()
    leftovers = [p.name for p in _temporaries(ck_dir)]
    if mode == "after_tensors":
        assert (ck_dir / "ckpt-000008.safetensors").is_file() and leftovers == []
    else:
        suffix = ".safetensors." if mode == "mid_tensors" else ".json."
        assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt-000008" + suffix), leftovers
    assert [p.name for p in list_checkpoints(ck_dir)] == ["ckpt-000004.json"]
    assert latest_valid_checkpoint(ck_dir) == ck_dir / "ckpt-000004.json"
    config_before = (run / "config.json").read_bytes()

    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "resumed from ckpt-000004.json at step 4" in err

    # Training finished; nothing is corrupt or half-written.
    assert [p.name for p in list_checkpoints(ck_dir)] == ["ckpt-000004.json", "ckpt-000008.json"]
    for meta_path in list_checkpoints(ck_dir):
        ck = load_checkpoint(meta_path)  # verifies the sha256 recorded in the JSON
        assert ck.meta["tensors_sha256"] == sha256_file(meta_path.with_suffix(".safetensors"))
    assert sorted(p.name for p in ck_dir.iterdir()) == [
        "ckpt-000004.json", "ckpt-000004.safetensors", "ckpt-000008.json", "ckpt-000008.safetensors",
    ]
    assert _temporaries(run) == []
    assert (run / "config.json").read_bytes() == config_before
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step once: the lines after step 4 were replaced
    assert len(list((run / "traversals").glob("c*.png"))) == 18

    # The interrupted-and-resumed run equals the uninterrupted one (the process-global torch RNG
    # aside, which training does not use; see test_loop.test_resume_is_exact).
    resumed = load_checkpoint(ck_dir / "ckpt-000008.json")
    straight = load_checkpoint(straight_run / "checkpoints" / "ckpt-000008.json")
    assert resumed.meta["step"] == straight.meta["step"] == 8
    keys = [k for k in straight.tensors if k != "rng.torch_cpu"]
    assert sorted(keys) == sorted(k for k in resumed.tensors if k != "rng.torch_cpu")
    for key in keys:
        assert torch.equal(resumed.tensors[key], straight.tensors[key]), key


# --------------------------------------------------------------------------------------------------
# Unwritable output folder


def _unprivileged_uid() -> int | None:
    """The uid to run as for permission tests: ours if not root, else nobody's (None if absent)."""
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return None


@contextmanager
def _as_user(uid: int) -> Iterator[None]:
    """Run the block with effective uid ``uid`` (no-op when that is already ours); root returns after."""
    if uid == os.geteuid():
        yield
        return
    gid = pwd.getpwuid(uid).pw_gid
    groups = os.getgroups()
    os.setgroups([])  # root's supplementary groups would otherwise still grant access
    os.setegid(gid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.setgroups(groups)


class Sandbox(NamedTuple):
    base: Path  # owned by `uid`, mode 0755: raw/ (12 synthetic fundus JPEGs), ck/ckpt-000008.*
    uid: int  # the user the permission tests run as


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory, straight_run: Path) -> Iterator[Sandbox]:
    """A folder the test user owns (outside pytest's owner-only tmp tree when that user is not us),
    holding a small raw synthetic dataset and a checkpoint, all readable by that user."""
    from retinagen.data.synthetic import write_synth_dataset

    uid = _unprivileged_uid()
    if uid is None:
        pytest.skip("running as root and there is no 'nobody' user to drop to")
    base = Path(tempfile.mkdtemp(prefix="retinagen-faults-"))
    try:
        write_synth_dataset(base / "raw", n=12, resolution=64, seed=5, workers=1, progress=False)
        (base / "ck").mkdir()
        for suffix in (".json", ".safetensors"):
            src = straight_run / "checkpoints" / f"ckpt-000008{suffix}"
            shutil.copyfile(src, base / "ck" / src.name)
        base.chmod(0o755)
        if uid != os.geteuid():
            gid = pwd.getpwuid(uid).pw_gid
            for p in [base, *base.rglob("*")]:
                os.chown(p, uid, gid)
        yield Sandbox(base, uid)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def readonly_dir(sandbox: Sandbox, request: pytest.FixtureRequest) -> Iterator[Path]:
    """An empty folder in the sandbox that its owner may read but not write (mode 0500)."""
    ro = sandbox.base / f"ro-{request.node.name.replace('[', '-').replace(']', '')}"
    ro.mkdir()
    if sandbox.uid != os.geteuid():
        os.chown(ro, sandbox.uid, pwd.getpwuid(sandbox.uid).pw_gid)
    ro.chmod(0o500)
    try:
        yield ro
    finally:
        ro.chmod(0o700)
        shutil.rmtree(ro, ignore_errors=True)


@pytest.mark.parametrize("command", ["synth", "prepare", "generate", "generate-into"])
def test_unwritable_output_folder(
    command: str, sandbox: Sandbox, readonly_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base, ro = sandbox.base, readonly_dir
    argv = {
        "synth": ["synth", "--out", str(ro / "synth"), "--n", "4", "--resolution", "32", "--workers", "1"],
        "prepare": ["prepare", "--dataset", "eyepacs", "--data-root", str(base / "raw"), "--resolution", "16",
                    "--out", str(ro / "ds.zip"), "--workers", "1"],
        "generate": ["generate", "--checkpoint", str(base / "ck" / "ckpt-000008.safetensors"), "--n", "3",
                     "--out", str(ro / "gen")],
        # The output folder exists but may not be written to.
        "generate-into": ["generate", "--checkpoint", str(base / "ck" / "ckpt-000008.safetensors"), "--n", "3",
                          "--out", str(ro)],
    }[command]
    before = _snapshot(base)
    capsys.readouterr()
    with _as_user(sandbox.uid):
        with pytest.raises(PermissionError):  # the premise: this user really cannot write there
            (ro / "probe").touch()
        code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert str(ro) in lines[0] and "permission denied" in lines[0], lines[0]
    assert list(ro.iterdir()) == []
    assert _temporaries(base) == []
    assert _snapshot(base) == before  # nothing else written or changed (no report, no stray folder)


# --------------------------------------------------------------------------------------------------
# Full disk


def _writers() -> dict[str, Callable[[Path], None]]:
    def zip_writer(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w") as zf:
            zf.writestr("a.txt", "new " * 1000)
            with open(tmp, "ab") as fh:  # the archive is half written when the disk fills up
                fh.write(b"x" * 100)
            raise _enospc()

    return {
        "bytes": lambda t: atomic_write_bytes(t, b"new" * 5000),
        "text": lambda t: atomic_write_text(t, "new" * 5000),
        "json": lambda t: atomic_write_json(t, {"new": list(range(2000))}),
        "with": lambda t: atomic_write_with(t, zip_writer),
    }


@pytest.fixture
def full_disk_after_half(monkeypatch: pytest.MonkeyPatch) -> None:
    """``Path.write_bytes`` writes the first half, then fails as a full disk does (fileio writes with it)."""

    def write_bytes(self: Path, data: bytes) -> int:
        with open(self, "wb") as fh:
            fh.write(bytes(data)[: len(data) // 2])
        raise _enospc()

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


@pytest.mark.parametrize("writer", ["bytes", "text", "json", "with"])
def test_full_disk_keeps_the_previous_file(writer: str, tmp_path: Path, full_disk_after_half: None) -> None:
    target = tmp_path / "out" / "result.dat"
    target.parent.mkdir()
    with open(target, "wb") as fh:  # the previous version (not written through the patched path)
        fh.write(b"old version\n")
    with pytest.raises(OSError) as info:
        _writers()[writer](target)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename == str(target)  # the target, not the temporary or None
    message = storage_error_message(info.value)
    assert message is not None and message.startswith(f"{target}: cannot write: {ENOSPC_TEXT}")
    assert target.read_bytes() == b"old version\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.dat"]


def test_storage_error_message_only_for_conditions_of_the_machine(tmp_path: Path) -> None:
    assert storage_error_message(PermissionError(errno.EACCES, "Permission denied", "/o/x.png")) == (
        "/o/x.png: permission denied (check that you may write to /o and that x.png is not read-only)"
    )
    assert "read-only file system" in (storage_error_message(OSError(errno.EROFS, "x", "/o/a")) or "")
    # Anything else stays a bug (traceback, exit code 1).
    assert storage_error_message(FileNotFoundError(errno.ENOENT, "No such file", "/o/a")) is None
    assert storage_error_message(ValueError("x")) is None
    # An OSError about some other file (a writer reading its input) keeps that file's name.
    target = tmp_path / "t.bin"

    def reads_input(tmp: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", "/elsewhere/input.png")

    with pytest.raises(PermissionError) as info:
        atomic_write_with(target, reads_input)
    assert info.value.filename == "/elsewhere/input.png" and list(tmp_path.iterdir()) == []


def test_full_disk_during_checkpoint_snapshots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import retinagen.artifact as ckmod

    folder = tmp_path / "checkpoints"
    tensors = {"w": torch.arange(4096, dtype=torch.float32)}
    save_checkpoint(folder / "ckpt-000004", tensors, {"step": 4})
    save_checkpoint(folder / "ckpt-000008", tensors, {"step": 8})
    before = _snapshot(folder)

    # 1. The disk fills up half-way through the tensor file of a new snapshot, and while overwriting one.
    real_save = ckmod.save_file

    def save_half(t: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
        real_save(t, filename, metadata=metadata)
        with open(filename, "r+b") as fh:
            fh.truncate(os.path.getsize(filename) // 2)
        raise _enospc()

    monkeypatch.setattr(ckmod, "save_file", save_half)
    for name in ("ckpt-000012", "ckpt-000008"):
        with pytest.raises(OSError) as info:
            save_checkpoint(folder / name, {"w": tensors["w"] + 1}, {"step": 12})
        assert info.value.filename == str(folder / f"{name}.safetensors")
        assert ENOSPC_TEXT in (storage_error_message(info.value) or "")
        assert _snapshot(folder) == before  # no partial file, the old checkpoint untouched
    monkeypatch.setattr(ckmod, "save_file", real_save)

    # 2. ... or while its JSON commit marker is written: the snapshot does not count, the last one does.
    real_json = ckmod.atomic_write_json

    def json_full(target: Path, obj: object, indent: int | None = 2) -> None:
        def half(tmp: Path) -> None:
            tmp.write_text(json.dumps(obj)[:50])
            raise _enospc()

        atomic_write_with(target, half)

    monkeypatch.setattr(ckmod, "atomic_write_json", json_full)
    with pytest.raises(OSError) as info:
        save_checkpoint(folder / "ckpt-000012", {"w": tensors["w"] + 1}, {"step": 12})
    assert info.value.filename == str(folder / "ckpt-000012.json")
    monkeypatch.setattr(ckmod, "atomic_write_json", real_json)
    assert latest_valid_checkpoint(folder) == folder / "ckpt-000008.json"
    assert [p.name for p in list_checkpoints(folder)] == ["ckpt-000004.json", "ckpt-000008.json"]
    assert _temporaries(folder) == []
    assert load_checkpoint(folder / "ckpt-000008.json").meta["step"] == 8


def _fail_after(monkeypatch: pytest.MonkeyPatch, target: type, attr: str, n_ok: int) -> None:
    """``target.attr`` works ``n_ok`` times, then writes nothing more and raises ENOSPC."""
    real = getattr(target, attr)
    calls = {"n": 0}

    def patched(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise _enospc()
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attr, patched)


def test_full_disk_in_synth_keeps_the_previous_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "synth"
    argv = ["synth", "--out", str(out), "--n", "8", "--resolution", "32", "--workers", "1"]
    assert main([*argv, "--seed", "1"]) == 0
    before = _snapshot(out)
    _fail_after(monkeypatch, Path, "write_bytes", 5)  # synth writes each JPEG with Path.write_bytes
    capsys.readouterr()
    assert main([*argv, "--seed", "2"]) == 2
    err = capsys.readouterr().err
    # synth writes its JPEGs with plain file writes, whose OSError names no file: --out is named.
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {out}: cannot write: {ENOSPC_TEXT} (free some space or write elsewhere)"], err
    assert "Traceback" not in err
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]  # no .partial folder left


def test_full_disk_in_prepare_keeps_the_previous_zip(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = sandbox.base / "raw"
    out = tmp_path / "ds.zip"
    argv = ["prepare", "--dataset", "eyepacs", "--data-root", str(raw), "--resolution", "16", "--out", str(out),
            "--workers", "1"]
    assert main(argv) == 0
    before = _snapshot(tmp_path)
    _fail_after(monkeypatch, zipfile.ZipFile, "writestr", 3)  # three PNGs in, then the disk is full
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {out}: cannot write: {ENOSPC_TEXT} (free some space or write elsewhere)"], err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # old ZIP and report intact, no temporary ZIP


def test_full_disk_in_generate(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = sandbox.base / "ck" / "ckpt-000008.safetensors"
    out = tmp_path / "gen"
    _fail_after(monkeypatch, Path, "write_bytes", 2)  # generate writes through fileio.atomic_write_bytes
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ck), "--n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: {out / 'seed0-000002.png'}: cannot write: {ENOSPC_TEXT} "
                     "(free some space or write elsewhere)"], err
    # The manifest did not fit either, so the 2 images written before the disk filled up were removed:
    # no synthetic image is left without its manifest row (SYN-1), and no temporary file.
    assert sorted(p.name for p in out.iterdir()) == [], list(out.iterdir())
    assert "removed the 2 images written before the error" in err


def test_full_disk_part_way_in_generate_leaves_a_manifest_listing_every_image(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The 3rd image does not fit, the manifest then does: the 2 whole images stay, both listed."""
    import csv

    ck = sandbox.base / "ck" / "ckpt-000008.safetensors"
    out = tmp_path / "gen"
    real, calls = Path.write_bytes, []

    def third_fails(self: Path, data: bytes) -> int:
        calls.append(self)
        if len(calls) == 3:
            raise _enospc()
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", third_fails)
    assert main(["generate", "--checkpoint", str(ck), "--n", "4", "--out", str(out)]) == 2
    assert _temporaries(out) == []
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["seed0-000000.png", "seed0-000001.png"]
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [(r["file"], r["synthetic"]) for r in rows] == [(p, "1") for p in pngs]
    for p in out.glob("*.png"):
        with Image.open(io.BytesIO(p.read_bytes())) as im:
            assert np.asarray(im).shape == (16, 16, 3)


def test_generate_into_a_folder_with_a_manifest_adds_to_it(
    sandbox: Sandbox, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second seed into the same folder keeps the first run's rows; a damaged manifest stops first."""
    import csv

    ck = sandbox.base / "ck" / "ckpt-000008.safetensors"
    out = tmp_path / "gen"
    assert main(["generate", "--checkpoint", str(ck), "--n", "2", "--out", str(out)]) == 0
    assert main(["generate", "--checkpoint", str(ck), "--n", "2", "--seed", "5", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert sorted(r["file"] for r in rows) == pngs and len(pngs) == 4 and {r["synthetic"] for r in rows} == {"1"}
    (out / "manifest.csv").write_text("file,label\nx.png,1\n")
    before = _snapshot(out)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(ck), "--n", "2", "--seed", "9", "--out", str(out)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and str(out / "manifest.csv") in lines[0] and "not a retinagen manifest" in lines[0]
    assert _snapshot(out) == before


def test_generate_interrupted_midway_keeps_its_images_marked(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error after some images are written (here: the 3rd image fails to encode) still leaves a
    manifest that marks every written image synthetic, so no unmarked synthetic image is left behind."""
    import csv

    from retinagen import generation
    from retinagen.generation import load_model, write_generated

    real_png, calls = generation.png_bytes, []

    def flaky(img):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a user's Ctrl-C lands here as well
        return real_png(img)

    monkeypatch.setattr(generation, "png_bytes", flaky)
    model = load_model(sandbox.base / "ck" / "ckpt-000008.safetensors", with_discriminator=False)
    out = tmp_path / "gen"
    with pytest.raises(KeyboardInterrupt):
        write_generated(model, out, 5, seed=0, progress=False)
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert [(r["file"], r["synthetic"]) for r in rows] == [("seed0-000000.png", "1"), ("seed0-000001.png", "1")]
    assert sorted(p.name for p in out.glob("*.png")) == ["seed0-000000.png", "seed0-000001.png"]
