"""Subcommands of ``vlm-probe`` that combine several layers (datasets + analyses + figures)."""
