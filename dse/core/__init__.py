"""The leaves of ``dse``: errors, the plug-in registry, checks of plain data and atomic writes.

Nothing here imports another part of ``dse``; every other room may import it.
"""
