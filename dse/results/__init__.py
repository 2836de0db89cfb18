"""What a study found, and what it is turned into: the trials table, the feasible front and its
hypervolume (:mod:`~dse.results.front`), terminal tables (:mod:`~dse.results.status`), plots
(:mod:`~dse.results.plots`), rank configs (:mod:`~dse.results.rankconfig`,
:mod:`~dse.results.export`) and compressed models (:mod:`~dse.results.compressed`).

Nothing here imports Optuna: studies are read through the attributes of Optuna's public API.
This face imports nothing, so that loading a compressed model imports neither pandas nor
matplotlib.
"""
