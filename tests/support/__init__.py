"""Test support: tiny models, an S3 server, token helpers and the test cluster, imported as tests.support.*."""
