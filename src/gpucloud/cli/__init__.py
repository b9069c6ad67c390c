"""The ``gpucloud`` command line (typer + rich): balances, statements, recharges, estimates."""
