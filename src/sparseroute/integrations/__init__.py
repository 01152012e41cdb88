"""Bridges to other libraries' modules: :mod:`sparseroute.integrations.hf` converts Hugging Face
sparse-MoE blocks to and from :class:`sparseroute.moe.MoE`."""
