"""rmlib: online backfilling for image retrieval.

Rank merge of an old and a new retrieval system, the reverse query transform psi,
metric-compatible contrastive learning (MCL) and the learnable new embedding rho, after
Seo et al., "Metric Compatible Training for Online Backfilling in Large-Scale Retrieval".
The modules follow the direction of data: config -> data -> models -> losses -> engine
(training loop, backbones, transforms, embeddings) -> evaluation (retrieval, backfill) ->
methods (setups, experiment, registry, reproduce) -> serving -> report -> own_upgrade -> cli.

Explained in the book: book/intro.
"""

__version__ = "0.1.0"


class RmlibError(Exception):
    """A user-facing error: its message is one line that says what is wrong and what to do."""
