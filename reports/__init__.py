"""Table and figure generators: the paper's tables and Figure 4 with our reproduced rows.

Entry point: ``python -m reports.build`` (see :mod:`reports.build`); the paper's
published numbers are in ``reports/paper/*.csv``.
"""
