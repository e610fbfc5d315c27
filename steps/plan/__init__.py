"""Planning: a matrix YAML becomes validated cells (schema, catalogs, layout, refusals, ids).

Imports no torch: it runs in the flow's first step and on a laptop before anything is spent.
"""
