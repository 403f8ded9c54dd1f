"""Small real servers and clients that tests run as processes (never mocks of our code)."""
