"""Serving during a live backfill.

Explained in the book: book/serving.
"""
