"""Checkpoints and encoder files, each read and written one way: `state` (training checkpoints: verify, newest
complete, tensors-only loading), `encoder` (read any source, fit, load strictly), `export` (write an export
directory), `formats` (timm and HF layouts), `hub` (local or Hub repositories)."""
