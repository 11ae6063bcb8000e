"""Subcommands of the ``sa-peft`` command; each module has ``register(subparsers)`` and ``run(args)``."""
