"""pf2lora.silo: the silo daemon that dials out to the coordinator and trains locally."""
