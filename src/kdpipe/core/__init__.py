"""The base layer: errors, the params schema, atomic writes, default paths, progress bars.

Imports nothing else from kdpipe; every other layer may import it.
"""
