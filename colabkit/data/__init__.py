"""Dataset staging: bring a dataset from Drive, a link, a URL or a bucket onto fast local disk.

:func:`colabkit.data.stage.stage` fetches, verifies, safely extracts and
atomically publishes a dataset; :func:`colabkit.data.archive.make_archive`
packs a folder into one zip for upload to Drive. Modules here load lazily.
"""
