"""Local learning: two-level model, base models, bilevel trainer, hypergradients, batches, eval."""
