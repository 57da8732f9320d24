"""Command-line subcommands: each module has ``register(subparsers)`` and sets ``func``.

Commands import the library inside the functions that use it (``run`` and its helpers), not at
the top of their modules: :mod:`smartformer.cli` imports every command module to build the
parser, so ``smartformer --help`` and argument errors would otherwise wait for MONAI,
scikit-learn, pandas and matplotlib, which library modules import at their top. At the top, a
command imports only what ``register`` needs (defaults, choices, help text) from light modules.
This is the one place imports are deferred; ruff's PLC0415 exempts ``cli.py`` and ``commands/``
(pyproject.toml).
"""
