"""dse: design-space exploration of low-rank decompositions of LLM weights.

The public API is small; heavy modules (transformers, optuna, lm-eval) load on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {
    "decompose_": "dse.decompose", "restore_": "dse.decompose", "is_decomposed": "dse.decompose",
    "Plan": "dse.plan", "PlanError": "dse.plan", "uniform_plan": "dse.plan",
    "LowRankLinear": "dse.lowrank",
    "METHODS": "dse.methods", "register_method": "dse.methods", "SVDConfig": "dse.methods",
    "Tucker2Config": "dse.methods",
    "FactorCache": "dse.cache",
    "find_projections": "dse.arch", "register_family": "dse.arch", "Family": "dse.arch",
    "load_model": "dse.models", "load_config": "dse.models",
    "Space": "dse.space", "SpaceError": "dse.space", "format_counts": "dse.space", "load_space": "dse.space",
    "AllocationSpace": "dse.allocation", "Budget": "dse.allocation", "allocate": "dse.allocation",
    "projection_table": "dse.shapes",
    "load_compressed": "dse.compressed", "apply_config": "dse.compressed",
    "RankConfig": "dse.export", "load_config_file": "dse.export",
    "trials_frame": "dse.results", "pareto_front": "dse.results", "hypervolume_history": "dse.results",
    "calibrate": "dse.calibration", "CalibrationSpec": "dse.calibration", "Calibration": "dse.calibration",
    "ASVDConfig": "dse.data_aware", "SVDLLMConfig": "dse.data_aware",
    "EvalConfig": "dse.evaluate", "Evaluator": "dse.evaluate", "PerplexityConfig": "dse.evaluate",
    "plan_size": "dse.size", "param_count": "dse.size", "model_bytes": "dse.size",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dse' has no attribute {name!r}")
