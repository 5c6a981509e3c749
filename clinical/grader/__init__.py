"""Downstream proof of synthetic rebalancing: a DR grader trained three ways, tested on held-out real data.

* `clinical.grader.data`: uint8 images from a prepared ZIP or a synthetic folder, the patient-level split;
* `clinical.grader.model`: the grader (architectures, presets, training, prediction, data-only files);
* `clinical.grader.stats`: QWK, balanced accuracy, recall, referable AUROC, bootstrap intervals;
* `clinical.grader.downstream`: the three arms (real only, real + synthetic, synthetic only) and their report.

The names below are the package's API; import them from here.
"""

from clinical.grader.data import (
    GradedImages,
    RealSplit,
    SyntheticSet,
    load_synthetic_folder,
    resize_uint8,
    split_by_group,
    split_real,
)
from clinical.grader.downstream import ARMS, render_markdown, run_downstream, summary_lines
from clinical.grader.model import (
    ARCHITECTURES,
    GRADER_FORMAT,
    GRADER_VERSION,
    PRESETS,
    Grader,
    GraderConfig,
    augment_batch,
    grader_config,
    load_grader,
    predict_proba,
    save_grader,
    train_grader,
)
from clinical.grader.stats import (
    balanced_accuracy,
    bootstrap_indices,
    bootstrap_samples,
    confusion_matrix,
    evaluate_predictions,
    kappa_from_confusion,
    per_grade_recall,
    percentile_interval,
    quadratic_weighted_kappa,
    referable_auroc,
    referable_scores,
)
from retinagen.dr_scale import NUM_GRADES, REFERABLE_GRADE

__all__ = [
    "ARCHITECTURES",
    "ARMS",
    "GRADER_FORMAT",
    "GRADER_VERSION",
    "NUM_GRADES",
    "PRESETS",
    "REFERABLE_GRADE",
    "GradedImages",
    "Grader",
    "GraderConfig",
    "RealSplit",
    "SyntheticSet",
    "augment_batch",
    "balanced_accuracy",
    "bootstrap_indices",
    "bootstrap_samples",
    "confusion_matrix",
    "evaluate_predictions",
    "grader_config",
    "kappa_from_confusion",
    "load_grader",
    "load_synthetic_folder",
    "per_grade_recall",
    "percentile_interval",
    "predict_proba",
    "quadratic_weighted_kappa",
    "referable_auroc",
    "referable_scores",
    "render_markdown",
    "resize_uint8",
    "run_downstream",
    "save_grader",
    "split_by_group",
    "split_real",
    "summary_lines",
    "train_grader",
]
