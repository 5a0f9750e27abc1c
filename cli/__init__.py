"""pf2lora.cli: the `pf2lora` console command and its subcommands."""
