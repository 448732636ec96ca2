"""The application layer: commands and servers built on the flexattn_jax library (nothing in the library imports it)."""
