"""Files for people: CSV / JSON / markdown tables and number formatting (:mod:`fisherlab.io.tables`)."""

from .tables import fmt, markdown_table, read_csv, text_table, write_csv, write_json

__all__ = ["fmt", "markdown_table", "read_csv", "text_table", "write_csv", "write_json"]
