"""Alembic migrations of the ledger schema, shipped inside the package."""

# The newest revision; a test checks it against the scripts in versions/.
HEAD = "0009_meter_gpu_product"
