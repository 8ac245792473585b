"""What every kernel's host code asks before a launch: is Triton's interpreter running (TRITON_INTERPRET=1, CPU
tensors; it pays per loop iteration, so the kernels then take whole rows or dimensions in one block)."""

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
