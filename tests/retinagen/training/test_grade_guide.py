"""loss.grade_guide: a frozen fundus-encoder grader whose cross-entropy on the fakes joins G's loss only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from retinagen.config import load_run_config, parse_overrides
from retinagen.data.dataset import ZipImageDataset
from retinagen.errors import CheckpointError, RetinagenError
from retinagen.metrics.encoder import train_fundus_encoder
from retinagen.training.grade_guide import load_grade_guide
from retinagen.training.loop import Trainer, _loader, _open_training_data, train


@pytest.fixture(scope="module")
def guide_path(synth_zip_16: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("guide") / "guide"
    return train_fundus_encoder(synth_zip_16, out, epochs=1, batch_size=8, seed=0, progress=False)


def _cfg(data: Path, *extra: str):
    return load_run_config("synthfundus", preset="smoke", overrides=parse_overrides([f"data.path={data}", *extra]))


def test_the_guide_reads_Gs_range_as_the_encoder_reads_uint8(guide_path: Path, synth_zip_16: Path) -> None:
    guide = load_grade_guide(guide_path, num_classes=5)
    ds = ZipImageDataset(synth_zip_16)
    u8 = torch.stack([torch.as_tensor(ds.read_uint8(i)).permute(2, 0, 1) for i in range(8)])
    net = guide.net
    want = net.grade_head(net(u8))
    got = guide(u8.float() / 127.5 - 1.0)
    assert torch.allclose(got, want, atol=1e-5)
    # At another size it is resized to the encoder's input first, as the encoder resizes uint8 images.
    big = u8.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(guide(big.float() / 127.5 - 1.0), net.grade_head(net(big)), atol=1e-5)
    assert not any(p.requires_grad for p in guide.parameters())


def test_refuses_a_missing_file_and_another_number_of_grades(guide_path: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_grade_guide(tmp_path / "none.safetensors", 5)
    with pytest.raises(CheckpointError, match="grades 5 classes, the model has 3"):
        load_grade_guide(guide_path, 3)


def _one_step(cfg, data: Path, run: Path) -> Trainer:
    trainer = Trainer(cfg, run, log=False)
    dataset = _open_training_data(trainer, data)
    real, grade = next(iter(_loader(trainer, dataset)))
    stats = trainer.train_step(real, grade)
    trainer.last_stats = stats
    return trainer


def test_the_guide_changes_Gs_step_and_not_Ds(guide_path: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    plain = _one_step(_cfg(synth_zip_16), synth_zip_16, tmp_path / "a")
    guided = _one_step(_cfg(synth_zip_16, f"loss.grade_guide={guide_path}", "loss.grade_guide_weight=5"),
                       synth_zip_16, tmp_path / "b")
    assert "loss/guide_ce" in guided.last_stats and "loss/guide_ce" not in plain.last_stats
    assert float(guided.last_stats["loss/guide_ce"]) > 0
    for (name, a), b in zip(plain.D.state_dict().items(), guided.D.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # D's step never sees the guide
    g_diff = [not torch.equal(a, b) for a, b in zip(plain.G.parameters(), guided.G.parameters(), strict=True)]
    assert any(g_diff)


def test_the_guide_judges_Gs_images_of_this_step_against_the_grades_G_was_asked_for(
    guide_path: Path, synth_zip_16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(synth_zip_16, f"loss.grade_guide={guide_path}")
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    dataset = _open_training_data(trainer, synth_zip_16)
    made, judged = [], []
    run_g, guide = trainer._run_G, trainer.guide

    def recording_run_g(sample, grade):
        made.append((run_g(sample, grade), grade))
        return made[-1][0]

    def recording_guide(images):
        judged.append(images)
        return guide(images)

    monkeypatch.setattr(trainer, "_run_G", recording_run_g)
    monkeypatch.setattr(trainer, "guide", recording_guide)
    real, grade = next(iter(_loader(trainer, dataset)))
    stats = trainer.train_step(real, grade)
    assert len(judged) == 1 and judged[0] is made[-1][0]  # G's phase's own images, not D's (detached) ones
    asked = made[-1][1]
    want = torch.nn.functional.cross_entropy(guide(made[-1][0].detach()), asked)
    assert float(stats["loss/guide_ce"]) == pytest.approx(float(want), rel=1e-5)
    assert judged[0].requires_grad  # the loss reaches G


def test_the_guide_reads_exported_pixel_values(guide_path: Path) -> None:
    guide = load_grade_guide(guide_path, num_classes=5)
    x = torch.randn(4, 3, 16, 16) * 3
    x.requires_grad_(True)
    logits = guide(x)
    assert torch.allclose(logits, guide(x.detach().clamp(-1, 1)), atol=1e-6)  # out-of-range values count as clamped
    logits.sum().backward()
    inside = x.detach().abs() < 1
    assert (x.grad[inside].abs() > 0).float().mean() > 0.5  # pixels in range get the guide's gradient
    assert (x.grad[~inside] == 0).all()  # pixels out of range none: nothing the guide reads moves with them


def test_needs_a_conditional_model(guide_path: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    cfg = _cfg(synth_zip_16, f"loss.grade_guide={guide_path}", "model.conditional=false")
    with pytest.raises(RetinagenError, match="grade-conditional"):
        Trainer(cfg, tmp_path / "run", log=False)


def test_resume_with_another_guide_file_is_refused(guide_path: Path, synth_zip_16: Path, tmp_path: Path) -> None:
    mine = tmp_path / "guide.safetensors"
    shutil.copy(guide_path, mine)
    shutil.copy(guide_path.with_suffix(".json"), mine.with_suffix(".json"))
    run = tmp_path / "run"
    cfg = _cfg(synth_zip_16, f"loss.grade_guide={mine}")
    train(cfg, run, progress=False, max_steps=2)
    assert train(cfg, run, resume=True, progress=False, max_steps=3).steps == 3  # the same guide resumes
    # A guide retrained into the same path (other weights, same config) is not the one the run trained with.
    train_fundus_encoder(synth_zip_16, tmp_path / "guide", epochs=1, batch_size=8, seed=1, progress=False)
    with pytest.raises(CheckpointError, match="not the grade guide this run was trained with"):
        train(cfg, run, resume=True, progress=False)


@pytest.fixture
def short_auto_guide(monkeypatch: pytest.MonkeyPatch) -> None:
    """The auto guide trained for one epoch (its recipe's length is not what these tests check)."""
    from retinagen.training import grade_guide

    monkeypatch.setattr(grade_guide, "AUTO_EPOCHS", 1)
    monkeypatch.setattr(grade_guide, "AUTO_MIN_STEPS", 0)


def test_auto_trains_the_guide_on_the_training_data_once(
    synth_zip_16: Path, tmp_path: Path, short_auto_guide: None
) -> None:
    from retinagen.fileio import sha256_file
    from retinagen.run_dir import RunDir
    from retinagen.training.checkpoint import latest_valid_checkpoint, load_checkpoint

    run = tmp_path / "run"
    cfg = _cfg(synth_zip_16, "loss.grade_guide=auto")
    train(cfg, run, progress=False, max_steps=2)
    guide = RunDir(run).grade_guide
    meta = json.loads(guide.with_suffix(".json").read_text())
    assert meta["data"]["fingerprint"] == ZipImageDataset(synth_zip_16).fingerprint()  # the run's own data
    ck = load_checkpoint(latest_valid_checkpoint(RunDir(run).checkpoints))
    assert ck.meta["grade_guide_sha256"] == sha256_file(guide)
    stamp = guide.stat().st_mtime_ns
    assert train(cfg, run, resume=True, progress=False, max_steps=3).steps == 3
    assert guide.stat().st_mtime_ns == stamp  # loaded again, not retrained
    # A guide that is not the one the run trained with (here: deleted, then retrained with another seed).
    for f in (guide, guide.with_suffix(".json")):
        f.unlink()
    train_fundus_encoder(synth_zip_16, guide.with_suffix(""), epochs=1, batch_size=8, seed=7, progress=False)
    with pytest.raises(CheckpointError, match="not the grade guide"):
        train(cfg, run, resume=True, progress=False)


def test_a_pickle_under_the_guides_name_is_refused_and_never_runs(guide_path: Path, tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "guide.safetensors"
    bad.write_bytes(pickle.dumps(Payload()))
    shutil.copy(guide_path.with_suffix(".json"), bad.with_suffix(".json"))
    with pytest.raises(CheckpointError):
        load_grade_guide(bad, 5)
    assert not marker.exists()


def test_an_auto_guide_of_other_data_in_the_run_folder_is_refused(
    synth_zip_16: Path, tmp_path: Path, short_auto_guide: None
) -> None:
    from retinagen.run_dir import RunDir

    run = tmp_path / "run"
    guide = RunDir(run).grade_guide
    guide.parent.mkdir(parents=True)
    train_fundus_encoder(synth_zip_16, guide.with_suffix(""), epochs=1, batch_size=8, seed=0, progress=False)
    meta = json.loads(guide.with_suffix(".json").read_text())
    meta["data"]["fingerprint"] = "0" * 64
    guide.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="trained on other data"):
        train(_cfg(synth_zip_16, "loss.grade_guide=auto"), run, progress=False, max_steps=1)
    guide.unlink()  # a JSON without its tensor file (a crash between the two writes)
    with pytest.raises(CheckpointError, match="delete"):
        train(_cfg(synth_zip_16, "loss.grade_guide=auto"), run, progress=False, max_steps=1)


def test_with_guide_augment_the_guide_reads_transformed_fakes(
    guide_path: Path, synth_zip_16: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(synth_zip_16, f"loss.grade_guide={guide_path}", "loss.grade_guide_augment=1")
    trainer = Trainer(cfg, tmp_path / "run", log=False)
    dataset = _open_training_data(trainer, synth_zip_16)
    made, judged = [], []
    run_g, guide = trainer._run_G, trainer.guide
    monkeypatch.setattr(trainer, "_run_G", lambda s, g: made.append(run_g(s, g)) or made[-1])
    monkeypatch.setattr(trainer, "guide", lambda x: judged.append(x) or guide(x))
    real, grade = next(iter(_loader(trainer, dataset)))
    trainer.train_step(real, grade)
    fake, seen = made[-1], judged[0]
    assert seen.shape == fake.shape and seen.requires_grad
    # Every image is moved (flip, turn, shift, scale, rotation, colour at p = 1), and G still gets the gradient.
    assert all(not torch.allclose(a, b, atol=1e-3) for a, b in zip(seen, fake, strict=True))
    x = fake.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(guide(trainer.guide_augment(x, trainer.gen)).sum(), x)
    assert g.abs().sum() > 0
