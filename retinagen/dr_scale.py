"""The diabetic-retinopathy grade scale (ICDR, as EyePACS and APTOS label it): one home for its size,
its names and where "referable" starts."""

from __future__ import annotations

NUM_GRADES = 5  # 0 no DR, 1 mild, 2 moderate, 3 severe non-proliferative, 4 proliferative
REFERABLE_GRADE = 2  # moderate NPDR or worse is referable
GRADE_NAMES = ("0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative")


def grade_label(grade: int) -> str:
    """``2`` -> ``"2 moderate"``; numbers outside the scale as they are."""
    return GRADE_NAMES[grade] if 0 <= grade < len(GRADE_NAMES) else str(grade)


def is_referable(grade: int) -> bool:
    return grade >= REFERABLE_GRADE
