"""Federation on Flower: the round callback, strategies, codecs, the ServerApp loop and ClientApp.

Everything Flower-specific lives here; models, data and evaluation never import this package.
"""
