"""Who may call what, how often: authentication, the policy document, admission and shared limits."""
