"""fedvlm: federated, multimodal, explainable medical AI on Lightning and Flower."""

__version__ = "0.1.0"
