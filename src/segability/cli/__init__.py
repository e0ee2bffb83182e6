"""The typer command line: a thin shell over the library (the only place errors become exit codes)."""
