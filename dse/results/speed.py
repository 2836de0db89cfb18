"""``dse speed TARGET``: the speed and memory of a model, a compressed folder or a rank config, and
of the dense model beside it.

A target is a rank config JSON (``dse export``; the model is loaded and decomposed in memory), a
folder written by ``dse apply`` (loaded with :func:`dse.load_compressed`), or anything
:func:`dse.load_model` takes. Each model is measured alone, one after the other, with
:func:`dse.evaluate.speed.measure_speed`.
"""

from __future__ import annotations

import csv
import gc
import io
import json
from pathlib import Path
from typing import List, Optional, Tuple

from ..core.errors import ConfigError
from ..evaluate.speed import SpeedConfig, SpeedReport, measure_speed
from ..model import load_model
from .compressed import META_FILE, decompose_config, load_compressed, read_meta
from .rankconfig import RankConfig, load_config_file

# report field -> (row label, format, the unit it is shown in, in the report's units)
ROWS = {
    "weight_bytes": ("weight bytes", "{:,.0f}", 1),
    "decode_tokens_per_s": ("decode tokens/s, batch 1", "{:.2f}", 1),
    "decode_batch_tokens_per_s": ("decode tokens/s, batch {batch}", "{:.2f}", 1),
    "prefill_tokens_per_s": ("prefill tokens/s, {batch} x {prompt}", "{:.1f}", 1),
    "ttft_ms": ("time to first token, ms", "{:.1f}", 1),
    "host_peak_bytes": ("peak host memory, bytes", "{:,.0f}", 1),
    "device_peak_bytes": ("peak device memory, bytes", "{:,.0f}", 1),
    "attained_bandwidth": ("decode bandwidth, GB/s", "{:.2f}", 1e9),  # bytes/s in JSON and CSV
    "compile_seconds": ("decode compilation, s", "{:.1f}", 1),
}


def is_compressed(target: str) -> bool:
    """A rank config or a folder written by ``dse apply`` (a target with a dense model beside it)."""
    path = Path(target).expanduser()
    return path.suffix == ".json" or (path.is_dir() and (path / META_FILE).is_file())


def load_target(target: str, *, device: str = "cpu", dtype: Optional[str] = None) -> Tuple[object, object, str]:
    """``(model, tokenizer, dense model name or None)`` for a target (see the module doc)."""
    path = Path(target).expanduser()
    if path.suffix == ".json":
        config = load_config_file(path)
        model, tokenizer = load_model(config.model, device=device, dtype=dtype or config.dtype)
        decompose_config(config, model, tokenizer)
        return model, tokenizer, config.model
    if path.is_dir() and (path / META_FILE).is_file():
        config = RankConfig.from_dict(read_meta(path).get("rank_config"), f"{META_FILE}.rank_config")
        model, tokenizer = load_compressed(path, device=device)
        return model, tokenizer, config.model
    model, tokenizer = load_model(target, device=device, dtype=dtype or "float32")
    return model, tokenizer, None


def speed_reports(
    target: str, config: SpeedConfig, *, against_dense: bool = False, device: str = "cpu", dtype: Optional[str] = None
) -> List[SpeedReport]:
    """The target's report, and with ``against_dense`` the dense model's after it (each measured with
    the other freed)."""
    if against_dense and not is_compressed(target):
        raise ConfigError(f"against: {target!r} is a dense model already; give a rank config or a compressed folder")
    model, tokenizer, dense = load_target(target, device=device, dtype=dtype)
    reports = [measure_speed(model, tokenizer, config, label=target)]
    if against_dense:
        dtype_now = str(next(model.parameters()).dtype).removeprefix("torch.")
        del model
        gc.collect()
        model, tokenizer = load_model(dense, device=device, dtype=dtype_now)
        reports.append(measure_speed(model, tokenizer, config, label=f"dense {dense}"))
    return reports


def format_reports(reports: List[SpeedReport]) -> str:
    """A text table: one column per report and, for two, their ratio (first over second)."""
    first = reports[0]
    names = {k: label.format(batch=first.config.batch, prompt=first.config.prompt) for k, (label, _, _) in ROWS.items()}
    head = ["", *(r.label for r in reports)] + (["ratio"] if len(reports) == 2 else [])
    rows = [head]
    for key, (_, fmt, unit) in ROWS.items():
        values = [getattr(r, key) for r in reports]
        if not any(values):
            continue
        row = [names[key], *(fmt.format(v / unit) for v in values)]
        if len(values) == 2:
            row.append(f"{values[0] / values[1]:.3f}" if values[1] else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    c = first.config
    lines.append(
        f"{first.device}, {first.dtype}, {first.threads} threads; median of {c.repeats} runs after "
        f"{c.warmup} warm-up; decode {c.new_tokens} steps after a {c.prompt}-token prompt"
        + ("; decode compiled over a static cache" if c.compile else "")
    )
    return "\n".join(lines)


def reports_json(reports: List[SpeedReport]) -> str:
    return json.dumps([r.row() for r in reports], indent=1) + "\n"


def reports_csv(reports: List[SpeedReport]) -> str:
    rows = [r.row() for r in reports]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
