"""The Transformer family (encoder, decoder, encoder-decoder) and its run-directory files."""

from glassmind.model.checkpoint import load_config, load_model as load, save_model
from glassmind.model.transformer import EncoderOutput, ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "EncoderOutput", "load", "load_config", "save_model"]
