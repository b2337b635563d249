"""Differential-privacy accounting for fedft: pure epsilon arithmetic and the privacy ledger.

``accounting`` turns the parameters of a run (clients, sampling, noise, local DP-SGD steps)
into dp-accounting events and epsilons; ``ledger`` records one row per round and can
recompute and audit every epsilon it holds. Neither imports Flower, torch or Opacus.
"""
