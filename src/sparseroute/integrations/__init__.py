"""Bridges to other libraries' modules: :mod:`sparseroute.integrations.hf` converts Hugging Face
sparse-MoE blocks to and from :class:`sparseroute.moe.MoE`; :mod:`sparseroute.integrations.minilm`
loads all-MiniLM-L6-v2 offline (the optional ``minilm`` extra) and embeds sentences with it."""
