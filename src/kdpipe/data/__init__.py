"""The data path: walking the data folder, decoding and checking images, the ledger of what was
decoded, packed row files and their integrity, the prepared data and augmented views readers,
samplers, ingest and the demo data set. Imports only :mod:`kdpipe.core`.
"""
