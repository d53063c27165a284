"""Model-parallel core: tensor-parallel layers, the GPT model and the datasets."""
