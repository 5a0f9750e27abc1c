"""pf2lora.common: what both daemons share, by concern in sub-packages (docs/architecture.md)."""
