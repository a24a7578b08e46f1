"""The data layer: raw files -> records (manifest) -> samples (decoded, augmented, tokenised) -> batches."""
