"""The live budget (`--follow`): the watch, the live-limit channel, the Dask-side preloads."""
