"""Models: loading (built-in names, hub ids, folders, GGUF), architecture families, shapes, text.

The built-in families register here. A family is one unit::

    from dse.model import Family, register_family

    register_family(Family("phi", ("phi",), "model.layers", {
        "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
        "self_attn.dense": "o", "mlp.fc1": "up", "mlp.fc2": "down"}))
"""

from .families import (CANONICAL_TYPES, FAMILIES, GENERIC, Family, Projection, family_of, find_projections,
                       locate, n_layers, ordered_types, register_family, tensor_types)
from .load import BUILTIN, DTYPES, load_config, load_model, resolve_device, resolve_dtype
from .text import TextSource, token_ids, token_windows
from .weights import model_bytes, param_count

_LLAMA_LIKE = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
}
register_family(Family("llama", ("llama", "mistral", "qwen2", "gemma", "gemma2", "qwen3"), "model.layers",
                       _LLAMA_LIKE))
register_family(Family("gpt2", ("gpt2",), "transformer.h", {
    "attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}))
register_family(Family("opt", ("opt",), "model.decoder.layers", {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
    "self_attn.out_proj": "o", "fc1": "up", "fc2": "down"}))
register_family(Family("bert", ("bert", "roberta"), "encoder.layer", {
    "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
    "attention.output.dense": "o", "intermediate.dense": "up", "output.dense": "down"}))
register_family(Family(GENERIC, ()))

__all__ = ["BUILTIN", "CANONICAL_TYPES", "DTYPES", "FAMILIES", "GENERIC", "Family", "Projection", "TextSource",
           "family_of", "find_projections", "load_config", "load_model", "locate", "model_bytes", "n_layers",
           "ordered_types", "param_count",
           "register_family", "resolve_device", "resolve_dtype", "tensor_types", "token_ids", "token_windows"]
