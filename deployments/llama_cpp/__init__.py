"""The llama.cpp engine: continuous batching of many sequences in one llama.cpp context on CPU."""
