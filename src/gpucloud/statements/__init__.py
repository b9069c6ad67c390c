"""Monthly account statements: collected from the ledger, rendered as CSV, PDF or JSON."""

from gpucloud.statements.collect import collect
from gpucloud.statements.render import to_csv, to_dict, to_pdf

__all__ = ["collect", "to_csv", "to_dict", "to_pdf"]
