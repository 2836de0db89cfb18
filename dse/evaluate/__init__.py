"""Evaluation of an in-memory model: lm-eval tasks, perplexity, decode speed, and the objectives a
study optimises. Nothing here knows how the model was decomposed.

The built-in objectives and task sources register here. An objective is one unit::

    from dse.evaluate import Objective, register_objective

    register_objective(Objective(
        "bits", attribute="bits_per_token", direction="minimize", label="bits per token",
        header="bits/token", fmt="{:.3f}",
        requires=lambda evaluation: None if evaluation.perplexity else "evaluation.perplexity",
        derive=lambda m: math.log2(m["perplexity"]) if "perplexity" in m else None))
"""

from ..core.lazy import lazy_names
from ..core.validate import finite
from .objectives import HEALED, OBJECTIVES, Objective, derive_metrics, healed, healed_metrics, register_objective
from .perplexity import perplexity
from .sources import BENCHMARK_FILES, TASK_SOURCES, LocalCopy, benchmarks_source, local_copy
from .tasks import check_tasks, convention_source, expand_tasks, load_tasks

# the modules that need torch load on first use of one of their names
__getattr__, _LAZY = lazy_names(
    __name__,
    {
        "config": ("ENGINES", "METRICS", "EvalConfig", "PerplexityConfig"),
        "encoder": ("TextSet", "embedding_similarity", "pseudo_perplexity", "sentence_embeddings"),
        "evaluator": ("Evaluator",),
        "latency": ("prompt_ids", "tokens_per_second"),
        "staged": ("EarlyStop", "staged_run"),
    },
)

register_objective(
    Objective(
        "accuracy",
        attribute="accuracy",
        direction="maximize",
        label="mean accuracy (fraction correct)",
        header="accuracy",
        fmt="{:.4f}",
        reference=0.0,
        requires=lambda evaluation: None if evaluation.tasks else "evaluation.tasks",
        help="mean accuracy over the evaluation tasks",
    )
)
register_objective(
    Objective(
        "params",
        attribute="params_ratio",
        direction="minimize",
        label="parameters (% of the undecomposed model)",
        header="params",
        fmt="{:.4f}",
        reference=1.0,
        size=True,
        help="parameters kept, as a fraction of the undecomposed model",
    )
)
register_objective(
    Objective(
        "perplexity",
        attribute="perplexity",
        direction="minimize",
        label="perplexity",
        header="perplexity",
        fmt="{:.2f}",
        requires=lambda evaluation: None if evaluation.perplexity else "evaluation.perplexity",
        help="perplexity of the evaluation text",
    )
)
register_objective(
    Objective(
        "latency",
        attribute="predicted_decode_ms",
        direction="minimize",
        label="predicted decode latency (ms per step)",
        header="pred. ms",
        fmt="{:.2f}",
        help="decode milliseconds per step predicted by the study's latency table (free, noise-free)",
    )
)
register_objective(
    Objective(
        "latency_measured",
        attribute="latency_ms_per_token",
        direction="minimize",
        label="measured latency (ms per token)",
        header="ms/token",
        fmt="{:.2f}",
        requires=lambda evaluation: None if evaluation.latency else "evaluation.latency",
        derive=lambda m: (
            1000.0 / m["latency_tokens_per_s"]
            if finite(m.get("latency_tokens_per_s")) and m["latency_tokens_per_s"] > 0
            else None
        ),
        help="decode milliseconds per token, timed per trial",
    )
)

register_objective(
    Objective(
        "similarity",
        attribute="embedding_similarity",
        direction="maximize",
        label="embedding similarity (mean cosine to the dense model)",
        header="cos sim",
        fmt="{:.4f}",
        reference=0.0,
        requires=lambda evaluation: None if evaluation.similarity else "evaluation.similarity",
        help="sentence embeddings' mean cosine similarity to the dense model's (encoders)",
    )
)
register_objective(
    Objective(
        "pseudo_perplexity",
        attribute="pseudo_perplexity",
        direction="minimize",
        label="pseudo-perplexity (masked tokens)",
        header="pseudo-ppl",
        fmt="{:.2f}",
        requires=lambda evaluation: None if evaluation.pseudo_perplexity else "evaluation.pseudo_perplexity",
        help="pseudo-perplexity of a masked-LM checkpoint, each token masked in turn",
    )
)

register_objective(healed(OBJECTIVES.get("accuracy")))  # the same measures after the study's heal:
register_objective(healed(OBJECTIVES.get("perplexity")))

TASK_SOURCES.register("benchmarks", benchmarks_source)
TASK_SOURCES.register("convention", convention_source)

__all__ = [
    "BENCHMARK_FILES",
    "ENGINES",
    "HEALED",
    "METRICS",
    "OBJECTIVES",
    "TASK_SOURCES",
    "EarlyStop",
    "EvalConfig",
    "Evaluator",
    "LocalCopy",
    "Objective",
    "PerplexityConfig",
    "TextSet",
    "benchmarks_source",
    "check_tasks",
    "convention_source",
    "derive_metrics",
    "embedding_similarity",
    "expand_tasks",
    "healed",
    "healed_metrics",
    "load_tasks",
    "local_copy",
    "perplexity",
    "prompt_ids",
    "pseudo_perplexity",
    "register_objective",
    "sentence_embeddings",
    "staged_run",
    "tokens_per_second",
]
