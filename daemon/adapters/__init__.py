"""The adapter library: folders of adapters, immutable versions, validation, live reload."""
