"""The diabetic-retinopathy grade scale (ICDR, as EyePACS and APTOS label it): one home for its size,
its names and where "referable" starts."""

from __future__ import annotations

NUM_GRADES = 5  # 0 no DR, 1 mild, 2 moderate, 3 severe non-proliferative, 4 proliferative
REFERABLE_GRADE = 2  # moderate NPDR or worse is referable
GRADE_NAMES = ("0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative")
# Grades judged together: a few microaneurysms (1) and a handful of neovascular tufts on top of severe
# NPDR (4) are the grades a fundus grader mixes up most, real images included (docs/ablations.md).
GRADE_GROUPS = ((0, 1), (2,), (3, 4))


def group_name(group: tuple[int, ...]) -> str:
    """``(3, 4)`` -> ``"3-4"``, ``(2,)`` -> ``"2"``."""
    return f"{group[0]}-{group[-1]}" if len(group) > 1 else str(group[0])


def grade_label(grade: int) -> str:
    """``2`` -> ``"2 moderate"``; numbers outside the scale as they are."""
    return GRADE_NAMES[grade] if 0 <= grade < len(GRADE_NAMES) else str(grade)


def is_referable(grade: int) -> bool:
    return grade >= REFERABLE_GRADE
