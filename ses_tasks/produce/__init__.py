"""The producer's side: the client API, campaigns, recipient files."""
