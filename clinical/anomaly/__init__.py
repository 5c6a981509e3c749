"""Anomaly scoring of fundus images from a trained MSI checkpoint's discriminator and Q head.

Laid out by concept, as anomalib lays out its models:

* `clinical.anomaly.inputs`: fundus files to model-range images, one status per file;
* `clinical.anomaly.features`: one feature vector per image from D's trunk at every scale and Q's posterior;
* `clinical.anomaly.methods`: the scoring methods (mahalanobis, knn, fanogan), a registry;
* `clinical.anomaly.scorer`: method + standardisation + calibration, its data-only files, fitting, scoring files;
* `clinical.anomaly.benchmark`: evaluation on labelled images and the anomaly benchmark.

The names below are the package's API; import them from here.
"""

from clinical.anomaly.benchmark import (
    CORRUPTIONS,
    benchmark_markdown,
    corrupt_fundus,
    detection_metrics,
    evaluate,
    run_benchmark,
)
from clinical.anomaly.features import FeatureExtractor, FeatureGroup, per_image_statistics
from clinical.anomaly.inputs import InputImage, expand_inputs, load_inputs, read_fundus_file
from clinical.anomaly.methods import (
    SCORERS,
    FanoganMethod,
    KnnMethod,
    MahalanobisMethod,
    ScoreMethod,
    ScoringContext,
    build_method,
    parse_options,
    register_scorer,
)
from clinical.anomaly.scorer import (
    DEFAULT_FPR,
    SCORER_FORMAT,
    SCORER_VERSION,
    AnomalyScorer,
    ImageScore,
    calibrate_threshold,
    fit_scorer,
    fit_scorer_on_images,
    load_scorer,
    load_scorer_model,
    score_files,
    write_scores_csv,
)

__all__ = [
    "CORRUPTIONS",
    "DEFAULT_FPR",
    "SCORERS",
    "SCORER_FORMAT",
    "SCORER_VERSION",
    "AnomalyScorer",
    "FanoganMethod",
    "FeatureExtractor",
    "FeatureGroup",
    "ImageScore",
    "InputImage",
    "KnnMethod",
    "MahalanobisMethod",
    "ScoreMethod",
    "ScoringContext",
    "benchmark_markdown",
    "build_method",
    "calibrate_threshold",
    "corrupt_fundus",
    "detection_metrics",
    "evaluate",
    "expand_inputs",
    "fit_scorer",
    "fit_scorer_on_images",
    "load_inputs",
    "load_scorer",
    "load_scorer_model",
    "parse_options",
    "per_image_statistics",
    "read_fundus_file",
    "register_scorer",
    "run_benchmark",
    "score_files",
    "write_scores_csv",
]
