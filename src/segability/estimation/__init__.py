"""Label-free output quality from SA scores: layer choice, calibration, the gate, baselines, metrics.

Layer 3 of segability: it reads the ``layers`` / ``images`` tables of an analysis run (pandas) and
torch probability maps; :mod:`segability.estimation.qc` runs the analysis layer below it. Two
estimators of Dice: the mean-SA map (:class:`Calibration`) and the SA-profile estimator
(:class:`QualityEstimator`, applied with its reference cache as a :class:`ProfileCalibration`).
"""

from segability.estimation.baselines import (
    boundary_confidence,
    mc_dropout_agreement,
    mean_entropy,
    mean_max_prob_foreground,
    pairwise_dice,
    tta_flip_agreement,
)
from segability.estimation.calibration import (
    Calibration,
    conformal_radius,
    fingerprint,
    state_dict_hash,
)
from segability.estimation.estimator import FlagStatus, QualityEstimator
from segability.estimation.evaluation import (
    MetricUndefinedWarning,
    aurc,
    compare_methods,
    eaurc,
    failure_auroc,
    pearson,
    spearman,
)
from segability.estimation.gate import (
    REASON_EMPTY,
    REASON_LOW_INPUT_SA,
    REASON_MODEL_FAILS,
    REASON_NO_INPUT_SA,
    GateStatus,
    quality_gate,
)
from segability.estimation.profile_gate import (
    ProfileCalibration,
    fit_profile_calibration,
    load_calibration,
    profile_gate,
)
from segability.estimation.qc import (
    QCEvaluation,
    baseline_scores,
    compare_qc,
    evaluate_qc,
    fit_calibration,
    gate_result,
    method_scores,
    qc,
    stream_baseline_scores,
)
from segability.estimation.selection import (
    decoder_layers,
    defined_layers,
    layer_spearman,
    mean_sa,
    select_layers,
)

__all__ = [
    "qc",
    "QualityEstimator",
    "FlagStatus",
    "ProfileCalibration",
    "fit_profile_calibration",
    "profile_gate",
    "load_calibration",
    "gate_result",
    "evaluate_qc",
    "compare_qc",
    "stream_baseline_scores",
    "fit_calibration",
    "baseline_scores",
    "method_scores",
    "QCEvaluation",
    "mean_sa",
    "defined_layers",
    "select_layers",
    "decoder_layers",
    "layer_spearman",
    "Calibration",
    "conformal_radius",
    "fingerprint",
    "state_dict_hash",
    "quality_gate",
    "GateStatus",
    "REASON_EMPTY",
    "REASON_LOW_INPUT_SA",
    "REASON_MODEL_FAILS",
    "REASON_NO_INPUT_SA",
    "mean_entropy",
    "mean_max_prob_foreground",
    "boundary_confidence",
    "tta_flip_agreement",
    "mc_dropout_agreement",
    "pairwise_dice",
    "MetricUndefinedWarning",
    "spearman",
    "pearson",
    "aurc",
    "eaurc",
    "failure_auroc",
    "compare_methods",
]
