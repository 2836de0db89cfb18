"""dse: design-space exploration of low-rank decompositions of LLM weights.

The public API is small; heavy modules (transformers, optuna, lm-eval) load on first use. The
package is laid out in rooms that import one way (see ``docs/architecture.md``)::

    cli -> study -> results -> {space, evaluate} -> decompose -> model -> core
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "DseError": "dse.core.errors",
    "ConfigError": "dse.core.errors",
    "SpaceError": "dse.core.errors",
    "PlanError": "dse.core.errors",
    "Registry": "dse.core.registry",
    "find_projections": "dse.model",
    "register_family": "dse.model",
    "Family": "dse.model",
    "FAMILIES": "dse.model",
    "load_model": "dse.model",
    "load_config": "dse.model",
    "projection_table": "dse.model.shapes",
    "TextSource": "dse.model",
    "decompose_": "dse.decompose",
    "decomposed": "dse.decompose",
    "restore_": "dse.decompose",
    "is_decomposed": "dse.decompose",
    "Plan": "dse.decompose",
    "uniform_plan": "dse.decompose",
    "LowRankLinear": "dse.decompose",
    "METHODS": "dse.decompose",
    "register_method": "dse.decompose",
    "MethodConfig": "dse.decompose",
    "SVDConfig": "dse.decompose",
    "Tucker2Config": "dse.decompose",
    "ASVDConfig": "dse.decompose",
    "SVDLLMConfig": "dse.decompose",
    "FactorCache": "dse.decompose",
    "calibrate": "dse.decompose",
    "CalibrationSpec": "dse.decompose",
    "Calibration": "dse.decompose",
    "plan_size": "dse.decompose",
    "heal_": "dse.decompose",
    "HealConfig": "dse.decompose",
    "HealReport": "dse.decompose",
    "param_count": "dse.model",
    "model_bytes": "dse.model",
    "Space": "dse.space",
    "format_counts": "dse.space",
    "load_space": "dse.space",
    "AllocationSpace": "dse.space",
    "Budget": "dse.space",
    "allocate": "dse.space",
    "EvalConfig": "dse.evaluate",
    "Evaluator": "dse.evaluate",
    "PerplexityConfig": "dse.evaluate",
    "OBJECTIVES": "dse.evaluate",
    "Objective": "dse.evaluate",
    "register_objective": "dse.evaluate",
    "trials_frame": "dse.results.front",
    "pareto_front": "dse.results.front",
    "hypervolume_history": "dse.results.front",
    "RankConfig": "dse.results.rankconfig",
    "load_config_file": "dse.results.rankconfig",
    "load_compressed": "dse.results.compressed",
    "apply_config": "dse.results.compressed",
    "heal_compressed": "dse.results.heal",
    "SAMPLERS": "dse.study",
    "load_study_config": "dse.study.config",
    "run_study": "dse.study.runner",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dse' has no attribute {name!r}")
