"""Fallback-quantized INT8 GEMMs for Linear layers (see ../shared/DESIGN.md, "FQ")."""
