"""The HTTP front door: OpenAI routes, their wire models, model status and ingress metrics."""
