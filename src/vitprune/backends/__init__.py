"""Adapters that put the token engine inside real model implementations."""
