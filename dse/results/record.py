"""The trial record: what ``dse`` keeps of one trial, written by the study's worker in one Optuna
user attribute and read back, by every reader, through :meth:`TrialRecord.of`.

A trial's record is written once, when the trial ends (one storage round trip, which matters on
a shared PostgreSQL); what must be known before then has its own attribute, written when the
trial is enqueued (``baseline``, ``baseline_spec``, ``start``, ``planned``) or starts (``worker``). Studies
written before records existed kept every entry as an attribute of its own: :meth:`TrialRecord.of`
reads those too.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Dict, List, Mapping, Optional


@dataclass(frozen=True)
class TrialRecord:
    """One trial as ``dse`` recorded it. ``metrics`` holds its sizes and measurements, keyed by the
    objectives' attributes (``params``, ``params_ratio``, ``accuracy``, ``acc/<task>`` ...)."""

    ATTRIBUTE: ClassVar[str] = "dse_record"  # the user attribute the record is written in
    EARLY: ClassVar[tuple] = ("baseline", "baseline_spec", "start", "planned", "worker")  # attributes of their own

    metrics: Mapping[str, Any] = field(default_factory=dict)
    plan: Optional[Mapping[str, Any]] = None  # ``Plan.to_dict()``
    plan_summary: Optional[str] = None
    constraints: Optional[List[float]] = None  # each <= 0 when satisfied (Optuna's convention)
    error: Optional[str] = None  # why the trial failed
    pruned: Optional[str] = None  # why the trial stopped early
    duplicate_of: Optional[int] = None  # the trial whose measurement this plan repeats
    baseline: Optional[str] = None
    baseline_spec: Optional[List[Any]] = None
    start: Optional[str] = None
    planned: Optional[Mapping[str, Any]] = None  # an enqueued start's plan (``Plan.to_dict()``)
    worker: Optional[str] = None  # host:pid of the process that ran it

    @classmethod
    def of(cls, trial) -> "TrialRecord":
        """The record of an Optuna trial (frozen or running)."""
        attrs = dict(trial.user_attrs)
        attrs.update(attrs.pop(cls.ATTRIBUTE, None) or {})
        known = {f.name for f in fields(cls)} - {"metrics"}
        entries = {k: v for k, v in attrs.items() if k in known}
        metrics = dict(attrs.pop("metrics", None) or {})
        metrics.update({k: v for k, v in attrs.items() if k not in known})  # a study written before records
        return cls(metrics=metrics, **entries)

    def write(self, trial) -> None:
        """Write the record into ``trial`` in one storage call (the early attributes are not
        written again)."""
        trial.set_user_attr(self.ATTRIBUTE, self.stored())

    def stored(self) -> Dict[str, Any]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in self.EARLY and getattr(self, f.name) not in (None, {})
        }

    def get(self, key: str, default=None):
        """A metric (or size) of the trial."""
        return self.metrics.get(key, default)

    def __getitem__(self, key: str):
        return self.metrics[key]

    def __contains__(self, key: str) -> bool:
        return key in self.metrics

    @property
    def satisfied(self) -> bool:
        """Every constraint holds (a trial with none has none to break)."""
        return all(c <= 0 for c in self.constraints or [])
