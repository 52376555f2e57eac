"""The ``medsynth`` command. Each module here registers its own subcommands; ``main`` wires them."""
