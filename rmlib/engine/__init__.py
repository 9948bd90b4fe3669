"""The engine: one training loop, cached runs, and what runs on it (backbones, transforms,
embedding extraction).

Explained in the book: book/models.
"""
