"""modelserve: an OpenAI-compatible LLM server on Ray Serve."""
