"""Files: datasets, downloads, the run directory, weight files (ours and the reference's)."""
