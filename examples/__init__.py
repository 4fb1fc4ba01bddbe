"""Small real services protected by the session lease interceptors, and the demo that runs them."""
