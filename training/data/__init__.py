"""The data layer: the STL format, splits, the image fetcher, the synthetic catalogue, popularity."""
