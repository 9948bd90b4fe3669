"""Evaluation: distances and protocols, the online-backfill simulation, the evaluation file."""
