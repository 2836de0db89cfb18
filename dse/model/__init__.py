"""Models: loading (built-in names, hub ids, folders, GGUF), architecture families, shapes, text.

The built-in families register here. A family is one unit, recognised on any model whose layers
hold its projections (see :mod:`dse.model.families`)::

    from dse.model import Family, register_family

    register_family(Family("distilbert", {
        "attention.q_lin": "q", "attention.k_lin": "k", "attention.v_lin": "v",
        "attention.out_lin": "o", "ffn.lin1": "up", "ffn.lin2": "down"}))
"""

from ..core.lazy import lazy_names
from .families import (
    CANONICAL_TYPES,
    FAMILIES,
    GENERIC,
    Family,
    FamilyLayout,
    Projection,
    family_of,
    find_projections,
    locate,
    n_layers,
    ordered_types,
    projections_from_config,
    register_family,
    tensor_types,
)
from .shapes import llama_layout
from .shipped import BUILTIN

# the modules that need torch load on first use of one of their names
__getattr__, _LAZY = lazy_names(
    __name__,
    {
        "devices": (
            "DEVICE_MAPS",
            "DeviceMap",
            "execution_device",
            "host_state_dict",
            "input_device",
            "is_offloaded",
            "module_tensors",
            "parse_device_map",
            "parse_max_memory",
        ),
        "load": (
            "DTYPES",
            "auto_class",
            "is_causal_lm",
            "is_masked_lm",
            "load_config",
            "load_model",
            "resolve_device",
            "resolve_dtype",
        ),
        "text": ("TextSource", "text_section", "token_ids", "token_windows"),
        "weights": ("model_bytes", "param_count"),
    },
)

register_family(
    Family(
        "llama",
        {
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.o_proj": "o",
            "mlp.gate_proj": "gate",
            "mlp.up_proj": "up",
            "mlp.down_proj": "down",
        },
        help="Llama-style names: Llama 2/3, Mistral, Qwen 2/3, Gemma 1/2/3, OLMo, Granite, SmolLM ...",
        shapes=llama_layout,
    )
)
register_family(
    Family(
        "phi3",
        {"self_attn.qkv_proj": "qkv", "self_attn.o_proj": "o", "mlp.gate_up_proj": "gate_up", "mlp.down_proj": "down"},
        help="fused qkv_proj and gate_up_proj (Phi-3)",
    )
)
register_family(
    Family(
        "phi",
        {
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.dense": "o",
            "mlp.fc1": "up",
            "mlp.fc2": "down",
        },
        help="Phi-1/1.5/2: dense output, fc1/fc2",
    )
)
register_family(
    Family(
        "gpt2",
        {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"},
        help="GPT-2: fused qkv c_attn, Conv1D weights stored (in, out)",
    )
)
register_family(
    Family(
        "opt",
        {
            "self_attn.q_proj": "q",
            "self_attn.k_proj": "k",
            "self_attn.v_proj": "v",
            "self_attn.out_proj": "o",
            "fc1": "up",
            "fc2": "down",
        },
        help="OPT: out_proj, fc1/fc2 beside the attention",
    )
)
register_family(
    Family(
        "bert",
        {
            "attention.self.query": "q",
            "attention.self.key": "k",
            "attention.self.value": "v",
            "attention.output.dense": "o",
            "intermediate.dense": "up",
            "output.dense": "down",
        },
        help="BERT / RoBERTa encoders (bert.encoder.layer, roberta.encoder.layer or a bare encoder.layer)",
    )
)
register_family(Family(GENERIC, help="every nn.Linear of the layers, typed by its attribute name (only when named)"))

__all__ = [
    "BUILTIN",
    "CANONICAL_TYPES",
    "DEVICE_MAPS",
    "DTYPES",
    "DeviceMap",
    "FAMILIES",
    "GENERIC",
    "Family",
    "FamilyLayout",
    "Projection",
    "TextSource",
    "auto_class",
    "execution_device",
    "family_of",
    "find_projections",
    "host_state_dict",
    "input_device",
    "is_causal_lm",
    "is_masked_lm",
    "is_offloaded",
    "load_config",
    "load_model",
    "locate",
    "model_bytes",
    "module_tensors",
    "n_layers",
    "ordered_types",
    "projections_from_config",
    "param_count",
    "parse_device_map",
    "parse_max_memory",
    "register_family",
    "resolve_device",
    "resolve_dtype",
    "tensor_types",
    "text_section",
    "token_ids",
    "token_windows",
]
