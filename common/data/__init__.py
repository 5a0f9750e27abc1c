"""Data for the silos: packaged corpora, local files, per-silo splits, partitioners, synthetic."""
