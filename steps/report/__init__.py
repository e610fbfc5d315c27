"""The report: comparisons, findings, figures and renderings, from results tables alone."""
