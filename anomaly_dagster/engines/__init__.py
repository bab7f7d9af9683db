"""Alternative engines for the compute-heavy stages (the DuckDB engine lives in ``pipeline``)."""
