"""Serving during a live backfill."""
