"""Evaluation: distances and protocols, the online-backfill simulation, the evaluation file.

Explained in the book: book/rank_merge.
"""
