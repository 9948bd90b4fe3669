"""The methods: each Table 1 row and ablation step as an entry of the registry, the
experiment that builds their backbones and transforms, and the runs that write results.

Explained in the book: book/table1.
"""
