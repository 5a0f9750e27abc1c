"""PF2LoRA and its baselines as client updates plus pure server aggregations over a sum."""
