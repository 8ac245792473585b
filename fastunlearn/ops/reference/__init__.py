"""The plain-PyTorch backends of the ops (same signatures and row conventions as the kernels): what runs where
no fast path can, and what every fast path is checked against."""
