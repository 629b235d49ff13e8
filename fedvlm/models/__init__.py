"""Models: encoders (timm, transformers), fusion layers and the task LightningModules."""
