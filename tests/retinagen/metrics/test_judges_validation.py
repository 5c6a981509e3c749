"""The shipped 32 px judges, validated like FID (Heusel et al.): held-out real images score near the floor,
each disturbance raises fd_fundus as its level rises, mode dropping lowers recall, and the grader judge reads
real grades. The building tests (tiny 16 px judges) are in test_judges.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retinagen.metrics import judges as jm
from retinagen.metrics.judges import (
    DISTURBANCES,
    JudgeSpec,
    build_judges,
    disturb,
    disturbance_table,
    get_judges,
    held_out_real,
)

DEFAULT = JudgeSpec()
HELD_OUT_SEED = 4242  # of no training run and of neither judge set


@pytest.fixture(scope="module")
def shipped() -> jm.Judges:
    judges = get_judges(DEFAULT)
    assert judges.folder.parent == jm.SHIPPED_JUDGES_DIR, "the default judges must ship with the package"
    return judges


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray, Any, list[str]]:
    return held_out_real(DEFAULT, DEFAULT.n_reference, HELD_OUT_SEED, tmp_path_factory.mktemp("heldout"))



def test_held_out_real_images_score_near_the_floor_and_every_disturbance_moves_fd(
    shipped: jm.Judges, held_out: tuple[np.ndarray, np.ndarray, Any, list[str]]
) -> None:
    imgs, grades, factors, names = held_out
    rows = disturbance_table(shipped, imgs, grades, factors, names)
    by = {(r["disturbance"], r["level"]): r for r in rows}
    floor = by[("none", 0.0)]
    # Held-out real images are about as close to the reference as one half of it is to the other half
    # (1000 vs 1000 images against 500 vs 500), and far below any visible disturbance.
    assert floor["fd_fundus"] < max(2 * shipped.meta["validation"]["fd_half_vs_half"], 1.0)
    assert floor["recall"] > 0.8 and floor["precision"] > 0.8
    for name in ("blur", "noise", "colour", "occlusion", "pigmentation_range", "repeated"):
        fds = [floor["fd_fundus"]] + [by[(name, lv)]["fd_fundus"] for lv in DISTURBANCES[name]]
        assert all(a < b for a, b in zip(fds, fds[1:], strict=False)), (name, fds)
        assert fds[-1] > 10 * floor["fd_fundus"], (name, fds)
    for name in ("pigmentation_range", "repeated"):
        recalls = [floor["recall"]] + [by[(name, lv)]["recall"] for lv in DISTURBANCES[name]]
        assert all(a >= b for a, b in zip(recalls, recalls[1:], strict=False)), (name, recalls)
        assert recalls[-1] < 0.1, (name, recalls)
    assert by[("one_grade", 0.0)]["fd_fundus"] > 10 * floor["fd_fundus"]
    assert by[("one_grade", 0.0)]["recall"] < 0.8 * floor["recall"]


@pytest.mark.slow
def test_a_rebuild_from_todays_code_validates_as_the_shipped_judges_do(
    shipped: jm.Judges, tmp_path: Path, two_threads: None
) -> None:
    """The shipped judges are the fixed instrument every recorded score was measured with, so they are kept when
    preprocessing changes (a rebuild is byte-identical only with the code that built them: test_judges.py builds
    twice). A rebuild from today's code must still be the same kind of judge: its own validation within a few
    per cent of the shipped one's (after the FOV refinement of 2026-12-07: fd half vs half 0.575 against 0.599,
    grade accuracy 0.564 against 0.580, referable 0.987 against 0.985)."""
    rebuilt = jm.load_judges(build_judges(DEFAULT, tmp_path / "judges", progress=False))
    new, old = rebuilt.meta["validation"], shipped.meta["validation"]
    assert new["fd_half_vs_half"] == pytest.approx(old["fd_half_vs_half"], rel=0.25)
    assert new["grade_accuracy"] == pytest.approx(old["grade_accuracy"], abs=0.05)
    assert new["referable_accuracy"] == pytest.approx(old["referable_accuracy"], abs=0.01)
    assert rebuilt.ref_features.shape == shipped.ref_features.shape


def test_disturbances_are_deterministic_and_keep_shapes(held_out: tuple[np.ndarray, np.ndarray, Any, list[str]]) -> None:
    imgs, grades, factors, names = held_out
    for name, levels in DISTURBANCES.items():
        a = disturb(name, levels[-1], imgs, grades, factors, names)
        b = disturb(name, levels[-1], imgs, grades, factors, names)
        assert a.shape == imgs.shape and a.dtype == np.uint8 and np.array_equal(a, b), name
    with pytest.raises(ValueError, match="unknown disturbance"):
        disturb("sharpen", 1.0, imgs, grades, factors, names)


def test_the_grader_judge_reads_grades_of_real_images(shipped: jm.Judges) -> None:
    v = shipped.meta["validation"]
    assert v["referable_accuracy"] > 0.95
    # Chance for a judge trained on equally likely grades is ~0.2; every grade is read well above it.
    assert v["grade_accuracy"] > 0.5 and min(v["grade_accuracy_per_grade"].values()) > 0.4


def test_a_grade_faithful_model_is_scored_on_the_references_grade_mix(
    shipped: jm.Judges, held_out: tuple[np.ndarray, np.ndarray, Any, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model that draws exactly real images of the asked grade: fd_fundus, precision and recall compare it
    with the reference on the reference's grade mix (not an equal mix, which a faithful model cannot match
    against a reference of mostly grade 0), and fidelity is judged on every grade asked equally often."""
    from types import SimpleNamespace

    import retinagen.generation as generation
    from retinagen.metrics.quality import _generate, score_checkpoint

    judges = shipped
    pool, pool_grades, _, _ = held_out  # 731 / 70 / 151 / 28 / 20 of grades 0-4: the equal mix repeats some
    by_grade = {g: pool[pool_grades == g] for g in range(5)}

    def faithful(model: Any, n: int, seed: int = 0, *, grade: int | None = None, start: int = 0, **_: Any):
        imgs = by_grade[grade]
        return imgs[(np.arange(n) + start) % len(imgs)], {}

    monkeypatch.setattr(generation, "generate_images", faithful)
    model = SimpleNamespace(resolution=DEFAULT.resolution, num_classes=5, cfg=SimpleNamespace(msi_name="faithful"),
                            meta={"kimg": 1.0, "train_seconds": 1.0}, sha256="0" * 64, D=None,
                            spec=SimpleNamespace(n_codes=0))
    row = score_checkpoint(model, judges, n=500, seed=0, quick=True)
    equal, asked = _generate(model, 500, 0)
    old = judges.score(equal, asked)  # the equal mix against the reference
    # Measured: 0.35 against 42.1 (the equal mix); held-out real images score ~0.3 (the floor).
    assert row["fd_fundus"] < 2.0 and old["fd_fundus"] > 10 * row["fd_fundus"]
    assert row["fidelity"] == old["fidelity"] and row["group_fidelity"] == old["group_fidelity"]
    assert np.bincount(asked, minlength=5).tolist() == [100] * 5
