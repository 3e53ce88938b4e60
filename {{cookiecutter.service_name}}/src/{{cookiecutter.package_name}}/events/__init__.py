"""Protobuf code generated from proto/ at build time (hatch_build.py). Never edit by hand."""
