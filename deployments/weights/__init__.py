"""Model weights: sources (paths, package://, s3://) fetched once per node into a shared cache."""
