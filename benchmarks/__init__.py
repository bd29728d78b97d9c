"""Measured comparisons behind `make bench`; each section writes JSON + Markdown (+ PNG)."""
