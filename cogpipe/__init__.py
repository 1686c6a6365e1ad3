"""cogpipe: latent video training and inference for the CogVideoX family."""

__version__ = "0.1.0"
