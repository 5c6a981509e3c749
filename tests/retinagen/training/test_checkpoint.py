"""Checkpoints are data-only, atomic, verified, and refuse pickles."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

import retinagen.fileio
from retinagen.errors import CheckpointError
from retinagen.training.checkpoint import (
    config_mismatch,
    flatten_optimizer,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sha256_file,
    unflatten_optimizer,
)
from retinagen.training.ema import ema_beta, update_ema


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # A generator state taken after draws (not a fresh one), so a wrong byte or length shows.
    return {"G.w": torch.randn(3, 4, generator=g), "D.b": torch.arange(5.0), "rng.cpu": g.get_state()}


def test_round_trip_and_hash(tmp_path: Path) -> None:
    saved = _tensors()
    meta_path = save_checkpoint(tmp_path / "ckpt-000010", saved, {"step": 10, "config": {"a": 1}})
    ck = load_checkpoint(meta_path)
    assert ck.meta["step"] == 10 and ck.meta["schema_version"] == 1
    assert torch.equal(ck.module_state("G")["w"], saved["G.w"])
    # Every tensor comes back with its dtype, shape and values: an RNG state (uint8) restores the stream.
    assert sorted(ck.tensors) == sorted(saved)
    for key, value in saved.items():
        assert ck.tensors[key].dtype == value.dtype and torch.equal(ck.tensors[key], value), key
    restored = torch.Generator()
    restored.set_state(ck.tensors["rng.cpu"])
    expected = torch.Generator()
    expected.set_state(saved["rng.cpu"])
    assert torch.equal(torch.randn(8, generator=restored), torch.randn(8, generator=expected))
    # The same checkpoint is reachable from the tensor file's path.
    assert load_checkpoint(tmp_path / "ckpt-000010.safetensors").meta["step"] == 10


def test_pickle_is_refused_before_parsing(tmp_path: Path) -> None:
    evil = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, evil)  # a ZIP holding a pickle
    # Not match="refused" alone: pytest's tmp_path for this test contains that word.
    with pytest.raises(CheckpointError, match="refused: a pickle"):
        load_checkpoint(evil)
    raw = tmp_path / "raw.safetensors"
    raw.write_bytes(pickle.dumps({"w": 1}, protocol=4))
    with pytest.raises(CheckpointError, match="refused: a pickle"):
        load_checkpoint(raw)


def test_corruption_and_missing_meta(tmp_path: Path) -> None:
    meta_path = save_checkpoint(tmp_path / "ckpt-000001", _tensors(), {"step": 1})
    tensor_path = meta_path.with_suffix(".safetensors")
    data = bytearray(tensor_path.read_bytes())
    data[-1] ^= 0xFF
    tensor_path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(meta_path)
    meta_path.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tensor_path)


def test_latest_valid_skips_incomplete_and_corrupt(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt-000001", _tensors(), {"step": 1})
    second = save_checkpoint(tmp_path / "ckpt-000002", _tensors(), {"step": 2})
    # A snapshot killed after its tensors but before its JSON: not listed.
    (tmp_path / "ckpt-000003.safetensors").write_bytes(second.with_suffix(".safetensors").read_bytes())
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001.json", "ckpt-000002.json"]
    assert latest_valid_checkpoint(tmp_path) == second
    # Corrupt the newest: the older one becomes the latest valid. First a flipped byte that keeps a
    # valid safetensors header (only the sha256 check can catch it), then bytes that are not safetensors.
    data = bytearray(second.with_suffix(".safetensors").read_bytes())
    data[-1] ^= 0xFF
    second.with_suffix(".safetensors").write_bytes(bytes(data))
    assert latest_valid_checkpoint(tmp_path).name == "ckpt-000001.json"
    second.with_suffix(".safetensors").write_bytes(b"\x00" * 20)
    assert latest_valid_checkpoint(tmp_path).name == "ckpt-000001.json"
    assert latest_valid_checkpoint(tmp_path / "nope") is None


class _Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the writer catches it."""


def test_the_json_commit_marker_is_renamed_into_place_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE-2: the tensor file is complete under its final name before the JSON is renamed onto
    its own; a kill right after the first rename leaves no checkpoint that is listed or loads."""
    first = save_checkpoint(tmp_path / "ckpt-000001", _tensors(), {"step": 1})
    real_replace = os.replace
    renamed: list[str] = []

    def recording_replace(src: str | Path, dst: str | Path) -> None:
        dst = Path(dst)
        if dst.suffix == ".json":
            # At the commit, the tensors it names are on disk, whole, under their final name.
            meta = json.loads(Path(src).read_text(encoding="utf-8"))
            tensors = dst.with_name(meta["tensors_file"])
            assert tensors.name in renamed and sha256_file(tensors) == meta["tensors_sha256"]
        real_replace(src, dst)
        renamed.append(dst.name)

    monkeypatch.setattr(retinagen.fileio.os, "replace", recording_replace)
    second = save_checkpoint(tmp_path / "ckpt-000002", _tensors(), {"step": 2})
    assert renamed == ["ckpt-000002.safetensors", "ckpt-000002.json"]
    assert load_checkpoint(second).meta["step"] == 2

    # Killed just after the first of the two files is in place.
    def dying_replace(src: str | Path, dst: str | Path) -> None:
        real_replace(src, dst)
        raise _Killed

    monkeypatch.setattr(retinagen.fileio.os, "replace", dying_replace)
    with pytest.raises(_Killed):
        save_checkpoint(tmp_path / "ckpt-000003", _tensors(), {"step": 3})
    monkeypatch.setattr(retinagen.fileio.os, "replace", real_replace)
    assert not (tmp_path / "ckpt-000003.json").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-000001.json", "ckpt-000002.json"]
    assert latest_valid_checkpoint(tmp_path) == second
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "ckpt-000003.safetensors")
    assert load_checkpoint(first).meta["step"] == 1


def test_optimizer_state_round_trip() -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.0, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    tensors, meta = flatten_optimizer("opt_G", opt.state_dict())
    opt2 = torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), lr=0.5)
    opt2.load_state_dict(unflatten_optimizer("opt_G", tensors, meta))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["lr"] == 0.01
    for idx in s1["state"]:
        for key in s1["state"][idx]:
            assert torch.equal(torch.as_tensor(s1["state"][idx][key]), torch.as_tensor(s2["state"][idx][key]))


def test_config_mismatch_names_keys() -> None:
    stored = {"model": {"resolution": 64, "style": True}, "train": {"kimg": 1}}
    current = {"model": {"resolution": 128, "style": True}, "train": {"kimg": 5}}
    diffs = config_mismatch(stored, current, ("model",))
    assert diffs == ["model.resolution: checkpoint 64 != config 128"]


def test_a_key_the_checkpoint_predates_counts_as_its_default() -> None:
    defaults = {"loss": {"beta": 1.0, "q_trunk_scale": 1.0, "new": {"x": 0}}}
    stored = {"loss": {"beta": 1.0}}  # saved before q_trunk_scale and the "new" block existed
    assert config_mismatch(stored, {"loss": {"beta": 1.0, "q_trunk_scale": 1.0, "new": {"x": 0}}}, ("loss",),
                           defaults) == []
    assert config_mismatch(stored, {"loss": {"beta": 1.0, "q_trunk_scale": 0.5, "new": {"x": 2}}}, ("loss",),
                           defaults) == ["loss.new.x: checkpoint 0 != config 2",
                                         "loss.q_trunk_scale: checkpoint 1.0 != config 0.5"]
    # Without defaults a missing key is a difference (the old rule), and a removed key always is.
    assert config_mismatch(stored, {"loss": {"beta": 1.0, "q_trunk_scale": 1.0}}, ("loss",)) == [
        "loss.q_trunk_scale: checkpoint None != config 1.0"]
    assert config_mismatch({"loss": {"beta": 1.0, "gone": 3}}, {"loss": {"beta": 1.0}}, ("loss",), defaults) == [
        "loss.gone: checkpoint 3 != config None"]


def test_ema_half_life_and_update() -> None:
    beta = ema_beta(batch_size=32, ema_kimg=10.0, images_seen=10**9, rampup=None)
    assert beta ** (10_000 / 32) == pytest.approx(0.5)
    assert ema_beta(32, 10.0, images_seen=0, rampup=0.05) == 0.0  # at the start EMA == model
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    update_ema(a, b, 0.0)
    assert torch.equal(a.weight, b.weight)


def test_ema_update_is_the_per_parameter_lerp_exactly() -> None:
    """The multi-tensor update is a speed-up only: bit-identical to lerp_ on each parameter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    ema = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    model[1].running_mean.add_(1.5)
    pairs = zip(ema.parameters(), model.parameters(), strict=True)
    expected = [pe.detach().clone().lerp_(p.detach(), 1.0 - 0.93) for pe, p in pairs]
    update_ema(ema, model, 0.93)
    for got, want in zip(ema.parameters(), expected, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(ema[1].running_mean, model[1].running_mean)  # buffers copied
    with pytest.raises(ValueError, match="EMA parameters"):
        update_ema(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), 0.5)
