"""Elastic compression: calibration, pruning baselines, nested masks, EPTS reconstruction, export.

Import the submodules directly (`sparsedial.compress.pruners`, `.epts`, `.pipeline`, ...); nothing heavy
is imported with the package itself.
"""
