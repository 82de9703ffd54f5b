"""The Transformer family (encoder, decoder, encoder-decoder) and its run-directory files."""

from glassmind.model.files import load_config, load_model, save_model
from glassmind.model.transformer import EncoderOutput, ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "EncoderOutput", "load_model", "load_config", "save_model"]
