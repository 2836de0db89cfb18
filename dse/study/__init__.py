"""Studies: the study file (:mod:`~dse.study.config`), Optuna storage and samplers, the
decompose-and-benchmark worker, the optimisation loop (:mod:`~dse.study.runner`), sensitivity
characterization and the fixed evaluation protocols of the benchmarks.

This is the only room that imports Optuna. The built-in samplers register here; a sampler is one
unit, an Optuna sampler class and ``dse``'s defaults::

    import optuna
    from dse.study import SAMPLERS, Sampler

    SAMPLERS.register("qmc", Sampler(optuna.samplers.QMCSampler, defaults={"scramble": True},
                                     help="quasi-Monte Carlo"))
"""

import optuna

from .modelsampler import ErrorModelSampler
from .samplers import SAMPLERS, Sampler, SamplerConfig, parse_sampler

SAMPLERS.register(
    "tpe",
    Sampler(
        optuna.samplers.TPESampler,
        defaults={"multivariate": True, "group": True, "n_startup_trials": 8, "constant_liar": False},
        shared={"constant_liar": True},
        help="tree-structured Parzen estimator (multivariate)",
    ),
)
SAMPLERS.register("nsga2", Sampler(optuna.samplers.NSGAIISampler, help="NSGA-II, a genetic multi-objective search"))
SAMPLERS.register("gp", Sampler(optuna.samplers.GPSampler, help="Gaussian-process Bayesian optimisation"))
SAMPLERS.register(
    "errormodel",
    Sampler(ErrorModelSampler, help="the error model's exact optimum, refitted after every trial (allocation spaces)"),
)
SAMPLERS.register("random", Sampler(optuna.samplers.RandomSampler, help="independent uniform draws"))

__all__ = ["ErrorModelSampler", "SAMPLERS", "Sampler", "SamplerConfig", "parse_sampler"]
