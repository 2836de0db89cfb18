"""What a study found, and what it is turned into: the trials table, the feasible front and its
hypervolume (:mod:`~dse.results.front`), terminal tables (:mod:`~dse.results.status`), plots
(:mod:`~dse.results.plots`), each trial's record (:mod:`~dse.results.record`), rank configs
(:mod:`~dse.results.rankconfig`,
:mod:`~dse.results.export`), compressed models (:mod:`~dse.results.compressed`, in the
:mod:`~dse.results.formats`) and speed reports
of any target (:mod:`~dse.results.speed`).

Nothing here imports Optuna: studies are read through the attributes of Optuna's public API. The
export formats register here; this face imports no pandas or matplotlib, so loading a compressed
model needs neither.
"""

from .formats import FORMATS, ExportFormat, write_low_rank, write_merged, write_transformers
from .record import TrialRecord

FORMATS.register("dse", ExportFormat(write_low_rank, True, "the factors; loads with dse.load_compressed"))
FORMATS.register(
    "transformers",
    ExportFormat(
        write_transformers,
        True,
        "the factors and their own modeling file: from_pretrained(folder, trust_remote_code=True), no dse needed",
    ),
)
FORMATS.register("merged", ExportFormat(write_merged, False, "dense weights multiplied back; plain from_pretrained"))

__all__ = ["FORMATS", "ExportFormat", "TrialRecord", "write_low_rank", "write_merged", "write_transformers"]
