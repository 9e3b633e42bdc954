"""Readers of every model source moedge loads: Hugging Face folders and hub ids, GGUF, llama2.c.

Each reader bounds what the file's header claims (``moedge.sources.limits``) and checks the
architecture is supported (``moedge.arch``) before torch or transformers allocate anything, and
returns a ``LoadedModel``. ``moedge.loading.load_model`` picks the reader; ``moedge.testbeds``
builds the named test beds from them.
"""
