"""Decomposition: methods (pure math, weight -> factors), plans, the factor cache, calibration,
module surgery (``decompose_`` / ``restore_``) and size accounting.

The built-in methods register here. A method is one unit, a config class and its math::

    from dataclasses import dataclass
    from typing import ClassVar
    from dse.decompose import MethodConfig, SVDForm, register_method, truncate_two

    @dataclass(frozen=True)
    class ScaledSVDConfig(MethodConfig):
        \"\"\"SVD of the weight with its columns scaled by ``power`` of their norms.\"\"\"
        name: ClassVar[str] = "scaled"
        power: float = 0.5

    ...
    register_method(ScaledSVDConfig, factorize, truncate_two)

(the whole example is in ``docs/architecture.md``).
"""

from ..core.lazy import lazy_names
from .data_aware import ASVDConfig, SVDLLMConfig, asvd_factorize, svdllm_factorize
from .methods import (
    METHODS,
    Method,
    MethodConfig,
    Rank,
    SVDForm,
    as_config,
    as_pair,
    get_method,
    make_config,
    register_method,
)
from .plan import PLAN_FORMAT, Plan, align_rank, uniform_plan
from .svd import SVDConfig, Tucker2Config, svd_form, truncate_three, truncate_two
from .twosided import TwoSidedConfig, twosided_factorize

# the modules that need torch load on first use of one of their names
__getattr__, _LAZY = lazy_names(
    __name__,
    {
        "cache": ("MEMORY", "FactorCache", "check_memory", "model_fingerprint"),
        "calibration": ("Calibration", "CalibrationSpec", "calibrate", "collect_calibration", "collect_stats"),
        "heal": (
            "HealConfig",
            "HealReport",
            "add_lora",
            "align_rank",
            "heal_",
            "heal_memory",
            "low_rank_modules",
            "remove_lora",
            "temporarily_healed",
        ),
        "lowrank": ("LowRankLinear",),
        "size": ("SizeReport", "plan_size"),
        "stats": ("InputStats", "ProjectionStats", "StatsStore"),
        "surgery": (
            "decompose_",
            "decomposed",
            "dense_modules",
            "factor_forms",
            "is_decomposed",
            "restore_",
            "swap_module",
        ),
    },
)

register_method(SVDConfig, svd_form, truncate_two)
register_method(Tucker2Config, svd_form, truncate_three, pair_ranks=True)
register_method(ASVDConfig, asvd_factorize, truncate_two)
register_method(SVDLLMConfig, svdllm_factorize, truncate_two)
register_method(TwoSidedConfig, twosided_factorize, truncate_two)

__all__ = [
    "ASVDConfig",
    "Calibration",
    "CalibrationSpec",
    "FactorCache",
    "HealConfig",
    "HealReport",
    "InputStats",
    "LowRankLinear",
    "MEMORY",
    "METHODS",
    "Method",
    "MethodConfig",
    "PLAN_FORMAT",
    "Plan",
    "ProjectionStats",
    "Rank",
    "SVDConfig",
    "SVDForm",
    "SVDLLMConfig",
    "SizeReport",
    "StatsStore",
    "Tucker2Config",
    "TwoSidedConfig",
    "add_lora",
    "align_rank",
    "as_config",
    "as_pair",
    "calibrate",
    "check_memory",
    "collect_calibration",
    "collect_stats",
    "decompose_",
    "decomposed",
    "dense_modules",
    "factor_forms",
    "get_method",
    "heal_",
    "heal_memory",
    "is_decomposed",
    "low_rank_modules",
    "make_config",
    "model_fingerprint",
    "plan_size",
    "register_method",
    "remove_lora",
    "restore_",
    "svd_form",
    "swap_module",
    "temporarily_healed",
    "truncate_three",
    "truncate_two",
    "twosided_factorize",
    "uniform_plan",
]
