"""Alembic migrations of the ledger schema, shipped inside the package."""

# The newest revision; a test checks it against the scripts in versions/.
HEAD = "0010_drop_usage_meter_index"
