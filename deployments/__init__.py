"""Serve deployments that run models, the engines behind them, and the weight cache."""
