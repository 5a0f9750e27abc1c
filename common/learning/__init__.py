"""Local learning on one silo: the two-level model, base-model loading, the bilevel trainer,
hypergradients, batching, evaluation and their configs.
"""
