"""Data layer: readers, dataset layouts → manifests, splits, preprocessing to 2-D slices, inspection."""
