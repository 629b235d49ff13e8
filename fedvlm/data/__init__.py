"""Data: records, real-layout loaders, the synthetic generator, partitioners, prepared tensors."""
