"""pf2lora.common: the model, trainer, algorithms, data and simulation shared by every process."""
