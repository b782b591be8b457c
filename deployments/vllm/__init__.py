"""The vLLM backend (GPU), served through Ray Serve LLM; needs the gpu extra."""
