"""The synthetic-data audit: fidelity (FID/KID, precision/recall/density/coverage) and privacy (memorisation,
membership inference), with the gate that decides whether a synthetic set may be shared."""
