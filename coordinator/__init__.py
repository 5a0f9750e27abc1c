"""pf2lora.coordinator: the coordinator service, its round engine and durable state."""
