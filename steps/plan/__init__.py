"""Planning: a matrix YAML becomes validated cells (schema, settings, catalogs, layout, refusals,
pre-launch checks, data sources, ids): what runs. What each cell will cost is the estimator's
(`steps.estimate`).

Imports no torch: it runs in the flow's first step and on a laptop before anything is spent.
"""
