"""vaepipe: a training pipeline for the VAE family (VAE, IWAE, beta-VAE)."""
__version__ = "0.1.0"
